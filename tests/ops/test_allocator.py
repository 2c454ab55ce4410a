"""The services fix glibc's allocation thresholds (docs/operations.md,
"Memory"); the memory test in tests/torture shows what that buys.
"""

from __future__ import annotations

import platform

from csnap_common.allocator import return_freed_buffers


def test_glibc_takes_the_fixed_thresholds() -> None:
    assert platform.libc_ver()[0] == "glibc", "the suite runs on Debian, with glibc"
    assert return_freed_buffers()

"""csnap_delta: deltas between two snapshots, written to a file and applied to an image.

A delta holds the chunks that may differ between snapshot FROM and snapshot
TO (csnapd's changelist), each extent with a digest of its bytes in FROM and
in TO, so that applying it checks the target really holds FROM first.
csnap_delta.layout is the byte layout (docs/format.md, "Delta files");
csnap_delta.write reads the chunks through csnapd; csnap_delta.apply writes
them into a raw image.
"""

from __future__ import annotations

from csnap_delta.apply import ApplyReport, DeltaRefusedError, apply_delta
from csnap_delta.layout import DeltaFormatError, DeltaHeader
from csnap_delta.write import DeltaWriteError, WriteReport, write_delta

__all__ = [
    "ApplyReport",
    "DeltaRefusedError",
    "apply_delta",
    "DeltaFormatError",
    "DeltaHeader",
    "DeltaWriteError",
    "WriteReport",
    "write_delta",
]

"""Run a command confined as the contrib/systemd units confine a service,
without systemd: the whole file system read-only except /dev, /proc, /sys
and one writable directory (ProtectSystem=strict with StateDirectory=),
no new privileges (NoNewPrivileges=), no writable-and-executable memory
(MemoryDenyWriteExecute=) and a reduced capability bounding set
(CapabilityBoundingSet=). Needs root (a private mount namespace).

    python -m tests.ops.sandbox WRITABLE CAPS -- PROGRAM ARGS...

CAPS is setpriv's list, e.g. "dac_override,dac_read_search", or "" for none.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
#: Per-mount flags a remount must keep (the kernel refuses to drop locked ones).
KEPT_FLAGS = {"nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x400, "relatime": 1 << 21}
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
#: What ProtectSystem=strict leaves writable.
API_FILE_SYSTEMS = ("/dev", "/proc", "/sys")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    # Bytes, not str: ctypes would pass a str as a wide-character string.
    name = None if source is None else source.encode()
    _check(libc.mount(name, target.encode(), None, flags, None), f"mount {target}")


def _mount_points() -> list[tuple[str, int]]:
    """Every mount point with the flags a remount must keep."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            flags = sum(KEPT_FLAGS.get(option, 0) for option in fields[5].split(","))
            points.append((point, flags))
    return points


def confine(writable: str) -> None:
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    _mount(writable, writable, MS_BIND)
    for point, flags in _mount_points():
        inside_api = any(point == p or point.startswith(p + "/") for p in API_FILE_SYSTEMS)
        if point == writable or inside_api:
            continue
        _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    _check(libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")


def main() -> None:
    writable, caps, separator, *argv = sys.argv[1:]
    assert separator == "--" and argv, __doc__
    confine(os.path.realpath(writable))
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv is missing (util-linux)"
    bounding = "-all" + "".join(f",+{cap}" for cap in caps.split(",") if cap)
    os.execv(setpriv, [setpriv, "--no-new-privs", "--bounding-set", bounding, "--", *argv])


if __name__ == "__main__":
    main()

"""csnap-check and its repair beside thin_check and thin_repair at a size of
one's choosing (10,000,000 exceptions, say), outside `scripts/bench`:

    python -m bench.checker_scale --exceptions 10000000 --json out.json DIR

The store is built as the scale part builds it (bench.engine_bench.
build_large: 64 snapshots), except that the copies are not written to the
data area (the checkers read only metadata; 10 M copies would be 40 GB),
the dm-thin metadata as it does (one mapping per
exception over 64 thin devices, restored with thin_restore); then one
round each of csnap-check and thin_check, and one repair each (the btree
root zeroed; thin_repair into a new file), timed from spawn to exit with
their peak resident memory (GNU time). The figures are written to the JSON
file after every step, so a run stopped by its time limit still leaves
what it measured. `--store` measures a store an earlier run built (the
build takes longest); `--only-csnap` leaves the dm-thin tools out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import missing_tools, progress
from bench.engine_bench import build_large
from bench.scale_bench import _exceptions, checkers, repairs, thin_metadata


def run(
    directory: Path,
    exceptions: int,
    out: Path,
    store: Path | None = None,
    *,
    only_csnap: bool = False,
) -> dict[str, Any]:
    figures: dict[str, Any] = {"requested_exceptions": exceptions}

    def save() -> None:
        out.write_text(json.dumps(figures, indent=1) + "\n")

    if store is None:
        progress(f"building a store of {exceptions:,} exceptions through the engine")
        t0 = time.perf_counter()
        store, _ = build_large(directory, exceptions, write_data=False)
        figures["build_s"] = time.perf_counter() - t0
        save()
    figures["exceptions"] = count = _exceptions(store)
    save()
    meta = None
    reason = missing_tools("thin_check", "thin_restore", "thin_repair")
    if only_csnap:
        figures["skipped"] = "thin_check and thin_repair (--only-csnap)"
    elif reason is None:
        meta, figures["thin_restore_s"] = thin_metadata(directory, count)
        save()
    else:
        figures["skipped"] = reason
    runs = checkers(directory, store, meta, 1)
    figures["check"] = {
        name: {"seconds": r["s"][0], "peak_rss_mib": r["mib"][0]} for name, r in runs.items()
    }
    save()
    figures["repair"] = repairs(directory, store, meta)
    for figure in (*figures["check"].values(), *figures["repair"].values()):
        figure["bytes_per_exception"] = round(figure["peak_rss_mib"] * 2**20 / count, 1)
    save()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path, help="where the store and metadata go")
    parser.add_argument("--exceptions", type=int, default=10_000_000)
    parser.add_argument("--json", type=Path, default=Path("checker-scale.json"))
    parser.add_argument(
        "--store",
        type=Path,
        help="a store an earlier run built (DIR/store), measured instead of building one",
    )
    parser.add_argument(
        "--only-csnap",
        action="store_true",
        help="measure csnap-check alone (the dm-thin tools' figures do not change with csnap)",
    )
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    figures = run(
        args.directory, args.exceptions, args.json, args.store, only_csnap=args.only_csnap
    )
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

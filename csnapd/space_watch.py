"""Early warning of a filling store, and the free-space reserve.

Owns two rules of docs/rules.md:

- the store warns before it is full: when the data area's use reaches
  `warn_at` percent, one `store.filling` line is logged and the status
  reply's store record says `space_warning`; when use falls below `warn_at`
  minus WARN_HYSTERESIS percentage points, one `store.filling_cleared` line
  is logged and the field clears. The gap keeps a store hovering at the
  threshold from logging a line per write.
- the reserve squashes in the background: with `keep_free` set, while less
  than that share of the data area is free, csnapd squashes the first
  expendable snapshot (the store-full order) between batches, one at a
  time, each only once the sweep has reclaimed what the one before freed.
  The decision is here; the dispatcher schedules it (csnapd.dispatch).

Changes nothing in the store by itself; reads the data area's size and free
count and says what it sees.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

__all__ = [
    "DEFAULT_WARN_AT",
    "WARN_HYSTERESIS",
    "SpacePolicy",
    "SpaceWatch",
    "keep_free_arg",
    "warn_at_arg",
]

log = logging.getLogger("csnapd")

#: Default warning threshold, in percent of the data area used.
DEFAULT_WARN_AT = 80
#: Percentage points below `warn_at` use must fall before the warning clears.
WARN_HYSTERESIS = 2


@dataclass(frozen=True, slots=True)
class SpacePolicy:
    """What csnapd was told about the data area's use; None is off."""

    #: Percent of the data area used at which csnapd warns (1..100).
    warn_at: int | None = DEFAULT_WARN_AT
    #: Percent of the data area csnapd keeps free by squashing (1..99).
    keep_free: int | None = None

    def __post_init__(self) -> None:
        if self.warn_at is not None and not 1 <= self.warn_at <= 100:
            raise ValueError(f"warn_at is 1 to 100 percent, not {self.warn_at}")
        if self.keep_free is not None and not 1 <= self.keep_free <= 99:
            raise ValueError(f"keep_free is 1 to 99 percent, not {self.keep_free}")


class SpaceWatch:
    """Follows the data area's use; logs the warning's changes."""

    def __init__(self, policy: SpacePolicy, store: str):
        self.policy = policy
        #: The store's path, for the log lines.
        self.store = store
        #: Use reached `warn_at` and has not yet fallen back under it
        #: by WARN_HYSTERESIS points.
        self.warning = False

    def observe(self, data_chunks: int, data_free: int) -> None:
        """Note the data area's use now; logs once per crossing each way."""
        warn_at = self.policy.warn_at
        if warn_at is None or data_chunks <= 0:
            return
        used = data_chunks - data_free
        if not self.warning and used * 100 >= warn_at * data_chunks:
            self.warning = True
            log.warning(
                "the store's data area is %.1f%% used, past the warning threshold of %d%%",
                100 * used / data_chunks,
                warn_at,
                extra={"event": "store.filling", "store": self.store},
            )
        elif self.warning and used * 100 < (warn_at - WARN_HYSTERESIS) * data_chunks:
            self.warning = False
            log.info(
                "the store's data area is %.1f%% used, back under the warning threshold of %d%%",
                100 * used / data_chunks,
                warn_at,
                extra={"event": "store.filling_cleared", "store": self.store},
            )

    def reserve_short(self, data_chunks: int, data_free: int) -> bool:
        """Whether less than `keep_free` percent of the data area is free."""
        keep_free = self.policy.keep_free
        return keep_free is not None and data_free * 100 < keep_free * data_chunks


def _percent_arg(text: str, low: int, high: int) -> int | None:
    spelled = text.strip().lower()
    if spelled == "off":
        return None
    try:
        percent = int(spelled.removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage or off: {text!r}") from None
    if not low <= percent <= high:
        raise argparse.ArgumentTypeError(f"a percentage from {low}% to {high}%, not {text!r}")
    return percent


def warn_at_arg(text: str) -> int | None:
    """`--warn-at`: a whole percentage 1..100 (`80%` or `80`), or `off`."""
    return _percent_arg(text, 1, 100)


def keep_free_arg(text: str) -> int | None:
    """`--keep-free`: a whole percentage 1..99 (`5%` or `5`), or `off`."""
    return _percent_arg(text, 1, 99)

"""The progress bar of long work (mkcsnap, csnap-check) shows how far it is
and how fast it goes, only on request or on a terminal, never on stdout."""

from __future__ import annotations

import io
import re

from csnap_common.progress import Progress


def test_bar_shows_percentage_count_and_rate() -> None:
    stream = io.StringIO()
    with Progress(200, "checking", stream=stream, delay=0, enabled=True) as bar:
        bar.advance(100)
    drawn = stream.getvalue().split("\r")
    assert re.fullmatch(r"checking \[#{15} {15}\]  50% 100/200 [\d.]+[kM]?/s", drawn[1]), drawn
    # Finishing draws it full, then ends the line.
    assert re.fullmatch(r"checking \[#{30}\] 100% 200/200 [\d.]+[kM]?/s\n", drawn[-1]), drawn
    assert bar.rate > 0


def test_bar_is_silent_when_not_enabled() -> None:
    stream = io.StringIO()
    with Progress(10, "formatting", stream=stream, delay=0, enabled=False) as bar:
        bar.advance(10)
    assert stream.getvalue() == ""

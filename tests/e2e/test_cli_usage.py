"""The csnap CLI refuses bad arguments as usage errors (exit 2, one line on
stderr, no traceback): timeouts that are not a positive finite number of
seconds, and tags that are not plain decimal digits (docs/operations.md,
"The csnap CLI"). Run as a real process, against no agent at all: a
usage error must come before any attempt to reach one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.e2e.processes import csnap

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("seconds", ["-1", "nan", "inf", "-inf", "0", "1e400", "soon"])
async def test_a_timeout_must_be_positive_finite_seconds(tmp_path: Path, seconds: str) -> None:
    result = await csnap(tmp_path / "no-agent.sock", f"--timeout={seconds}", "list")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "argument --timeout: a timeout is a" in result.stderr, result.stderr


@pytest.mark.parametrize("tag", ["0x10", " 7", "7 ", "+7", "-7", "1_0", "0o7", "\u0667", "", "7.0"])
async def test_a_tag_is_plain_decimal_digits(tmp_path: Path, tag: str) -> None:
    for verb in (["create", tag], ["delete", tag], ["status", tag], ["usecount", tag, "1"]):
        result = await csnap(tmp_path / "no-agent.sock", *verb)
        assert result.returncode == 2, (verb, result.stderr)
        assert "Traceback" not in result.stderr
        assert "a tag is a decimal number" in result.stderr, (verb, result.stderr)


async def test_good_arguments_reach_for_the_agent(tmp_path: Path) -> None:
    """The same verbs with good arguments are not usage errors: they fail
    only because no agent listens (exit 4)."""
    for argv in (
        ["--timeout", "0.5", "create", "4294967295"],
        ["--timeout=30", "usecount", "007", "-1"],
        ["priority", "7", "+5"],
    ):
        with trio.fail_after(30):
            result = await csnap(tmp_path / "no-agent.sock", *argv)
        assert result.returncode == 4, (argv, result.stderr)
        assert "cannot reach the agent" in result.stderr

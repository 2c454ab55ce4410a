"""The corruption campaign (tests/crash/corruption.py) at a size CI affords:
every injected fault found or harmless, every repair clean, no mapping of
an untouched block lost, no snapshot reading another's data.
"""

from __future__ import annotations

import os

from tests.crash.corruption import KINDS, campaign

INJECTIONS = int(os.environ.get("CSNAP_CORRUPTION_INJECTIONS", "60"))
HISTORIES = int(os.environ.get("CSNAP_CORRUPTION_HISTORIES", "3"))


def test_every_injected_fault_is_found_and_salvaged() -> None:
    outcomes = campaign(seed=1, injections=INJECTIONS, histories=HISTORIES)
    print(
        f"corruption campaign: {sum(outcomes[k] for k in KINDS)} faults injected"
        f" ({', '.join(f'{outcomes[k]} {k}' for k in KINDS)}):"
        f" {outcomes['repaired']} repaired whole, {outcomes['repaired-with-loss']}"
        f" repaired with chunks marked lost, {outcomes['harmless']} harmless"
    )
    assert sum(outcomes[kind] for kind in KINDS) >= INJECTIONS - HISTORIES
    assert outcomes["repaired"] + outcomes["repaired-with-loss"] > INJECTIONS // 2, outcomes

"""Shared pytest configuration: hypothesis profiles, the per-test time limit
(tests/timeouts.py) and the guard that no test leaves a process running
(tests/process_guard.py).

CI sets CI=true, which makes hypothesis load its built-in "ci" profile
(derandomised, no deadline). Locally the "dev" profile keeps runs short;
CSNAP_HYPOTHESIS_PROFILE=long is for hunting outside CI; "coverage" is the
derandomised profile scripts/test measures branch coverage with.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.process_guard", "tests.timeouts", "tests.suite_parts"]

settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# The same examples every run, so that the branch coverage of scripts/test
# measures the code and not the luck of the draw.
settings.register_profile(
    "coverage",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("CSNAP_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["CSNAP_HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):
    settings.load_profile("dev")

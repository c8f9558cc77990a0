"""Settings of the property-based fuzz tests (hypothesis).

The default suite runs a short, derandomized pass (``EXAMPLES`` cases per test, a few seconds in
all). A long run sets ``EDGESMITH_FUZZ_EXAMPLES`` (random seeds then), e.g.::

    EDGESMITH_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/runtime/test_fuzz_*.py \\
        -p no:cacheprovider --hypothesis-show-statistics

and the statistics report how many cases each test tried; docs/security.md records them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = "EDGESMITH_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("EDGESMITH_FUZZ_EXAMPLES", "40"))


def fuzz(share: float = 1.0) -> settings:
    """Hypothesis settings for one fuzz test: ``share`` of ``EXAMPLES`` cases."""
    return settings(
        max_examples=max(1, int(EXAMPLES * share)),
        deadline=None,  # a shared machine: time limits would only make the tests flaky
        database=None,  # nothing written into the checkout
        derandomize=not LONG,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )

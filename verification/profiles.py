"""Hypothesis profiles (registered by ``verification/conftest.py``) and per-test scaling.

* ``ci`` (the default): derandomized, a few examples per property; the whole suite well under 3 minutes.
* ``thorough``: ``THOROUGH_EXAMPLES`` (default 1000) examples per property, thousands in total; no deadline.

Select with ``HYPOTHESIS_PROFILE=thorough`` or ``pytest --hypothesis-profile=thorough``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def register() -> None:
    settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
    settings.register_profile("thorough", max_examples=int(os.environ.get("THOROUGH_EXAMPLES", "1000")), **_COMMON)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(weight: float) -> settings:
    """Settings with ``weight ×`` the active profile's examples (at least 1): expensive properties run fewer.

    Evaluated when a test module is imported, i.e. after the profile (env var or ``--hypothesis-profile``)
    has been loaded; every other setting is inherited from the profile."""
    return settings(max_examples=max(1, round(settings.default.max_examples * weight)))

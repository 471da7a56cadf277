"""The end-to-end scenarios (tests/scenarios.py) in the fake world: no root, seconds.
netns_tests/test_scenarios_netns.py runs the same ones in the namespace lab."""

import pytest

from scenarios import *  # noqa: F401,F403 - the scenarios and the world fixture

pytestmark = pytest.mark.parametrize("world", ["fakes"], indirect=True)

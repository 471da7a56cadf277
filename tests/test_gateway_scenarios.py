"""The gateway scenarios (tests/gateway_scenarios.py) in the fake world: no root, seconds.
netns_tests/test_gateway_scenarios_netns.py runs the same ones in the gateway lab."""

import pytest

from gateway_scenarios import *  # noqa: F401,F403 - the scenarios and the world fixture

pytestmark = pytest.mark.parametrize("world", ["fakes"], indirect=True)

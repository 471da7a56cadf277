"""The gateway scenarios (tests/gateway_scenarios.py, drawing there) in the gateway lab:
one lab (netns_tests/conftest.py ``glab``) for all of them, segment A used.
tests/test_gateway_scenarios.py runs the same ones in the fake world."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))

from gateway_scenarios import *  # noqa: E402,F401,F403 - the scenarios and the world fixture

pytestmark = [pytest.mark.lab, pytest.mark.parametrize("world", ["netns"], indirect=True)]

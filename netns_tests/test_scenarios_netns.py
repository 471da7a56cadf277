"""The end-to-end scenarios (tests/scenarios.py, drawing there) in the namespace lab:
one lab (netns_tests/conftest.py ``lab``) for all of them.
tests/test_scenarios.py runs the same ones in the fake world."""

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))

from scenarios import *  # noqa: E402,F401,F403 - the scenarios and the world fixture

pytestmark = [pytest.mark.lab, pytest.mark.parametrize("world", ["netns"], indirect=True)]

# The README's demo command, run as a user runs it: `python scripts/lab demo`
# builds the one-segment lab (key server, switch, h1-h3), then the gateway lab
# (two segments, gA with plain host p1, gB, a routed WAN), shows traffic
# crossing both and removes everything.  This test keeps the README honest.

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import skip_reason

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent


def test_readme_demo_runs_and_cleans_up(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab"), "--state-dir", str(tmp_path / "demo"),
                          "demo"], capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "=> the switch carried only EtherType 0x88B5: yes" in out
    assert out.count(": ok (3/3") >= 10, out[-3000:]            # 6 segment pings, 4 gateway pings
    assert "FAILED" not in out and "Traceback" not in out
    assert "segment A br0" in out and "pattern seen 0 times  [only 0x88b5" in out
    assert "WAN (gA side)" in out and "pattern seen 0 times  [only UDP" in out
    suffixes = set(re.findall(r"^lab ([0-9a-f]{5}) is down$", out, re.M))
    suffixes |= set(re.findall(r"segment [AB] ([0-9a-f]{5}):", out))
    assert len(suffixes) == 3, out[-3000:]                       # one segment lab, two gateway segments
    left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if any(n.endswith("-" + sfx) for sfx in suffixes)]
    assert not left, f"the demo left namespaces behind: {left}"

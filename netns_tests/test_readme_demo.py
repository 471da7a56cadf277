# The README's demo command, run as a user runs it: `python scripts/lab demo`
# builds the one-segment lab (key server, switch, h1-h3), then the gateway lab
# (two segments, gA with plain host p1, gB, a routed WAN), shows traffic
# crossing both and removes everything.  This test keeps the README honest:
# the demo's exit status follows its checks, and each check that a capture
# lacks something also counted what the capture held.

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import skip_reason

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent

SEGMENT_CHECKS = {f"ping-{s}-{d}-{v}" for s, d in (("h1", "h2"), ("h2", "h3"), ("h1", "h3")) for v in ("ipv4", "ipv6")}
SEGMENT_CHECKS |= {"ping-h1-h2-pattern", "h1-sent-only-sealed", "h2-sent-only-sealed", "h3-sent-only-sealed",
                   "switch-only-sealed", "pattern-sealed-on-the-switch"}
GATEWAY_CHECKS = {"ping-h1-10.66.0.31", "ping-h1-10.66.0.13", "ping-h3-10.66.0.31", "ping-h1-10.66.0.12",
                  "segment-a-only-sealed", "plain-side-only-p1-traffic", "wan-only-tunnel"}


def test_readme_demo_runs_and_cleans_up(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab"), "--state-dir", str(tmp_path / "demo"),
                          "demo"], capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    checks = dict(re.findall(r"^check (\S+): .* => (ok|FAILED)$", out, re.M))
    assert set(checks) == SEGMENT_CHECKS | GATEWAY_CHECKS, (sorted(checks), out[-3000:])
    assert [name for name, result in checks.items() if result != "ok"] == [], out[-4000:]
    assert res.returncode == 0, out[-3000:]
    assert "segment demo: every check ok" in out and "gateway demo: every check ok" in out
    assert "FAILED" not in out and "Traceback" not in out
    suffixes = set(re.findall(r"^lab ([0-9a-f]{5}) is down$", out, re.M))
    suffixes |= set(re.findall(r"segment [AB] ([0-9a-f]{5}):", out))
    assert len(suffixes) == 3, out[-3000:]                       # one segment lab, two gateway segments
    left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if any(n.endswith("-" + sfx) for sfx in suffixes)]
    assert not left, f"the demo left namespaces behind: {left}"

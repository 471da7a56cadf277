"""The lab fixtures shared by the namespace tests: ``lab`` (one segment, see
test_segment.py for the drawing) and ``glab`` (the gateway lab, drawn in
l2crypt/lab/gateway.py), each one per module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import assert_hosts_sent_only_sealed, skip_reason, skip_unless_gateway_lab  # noqa: E402
from hostile import MARKER as HOSTILE_MARKER  # noqa: E402

from l2crypt.lab import segment as L  # noqa: E402
from l2crypt.lab.cpu_share import share_cpu  # noqa: E402
from l2crypt.lab.gateway import GatewayLab  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cpu_share(request):
    """A module with ``ALONE = True`` (it asserts rates) runs with no other module beside it."""
    with share_cpu(alone=getattr(request.module, "ALONE", False)):
        yield


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    """A running lab (key server, switch, h1-h3, intruder), captured from before the agents.

    At the end of the module (after the attack, fault and operations tests
    too) the lifetime captures must hold sealed frames from every host and
    nothing else, none of the module's ``MARKER`` nor the hostile marker."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    # SIGINT, SIGTERM and SIGHUP become KeyboardInterrupt (in this process only,
    # never in a forked child), so this finalizer runs; an atexit hook in
    # l2crypt.lab.segment is the last resort.
    L.install_signal_cleanup()
    the_lab = L.Lab(state_dir=tmp_path_factory.mktemp("lab"), capture_from_start=True)
    try:
        the_lab.up(timeout_s=90)
        the_lab.add_intruder()
        yield the_lab
        markers = tuple(m for m in (getattr(request.module, "MARKER", None), HOSTILE_MARKER) if isinstance(m, bytes))
        assert_hosts_sent_only_sealed(the_lab, markers)
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def glab(request, tmp_path_factory):
    """A running gateway lab: segments A and B, gA (with p1 on its plain port), gB, the WAN.
    The key servers rotate NETKEY every ``NETKEY_REKEY_S`` seconds of the test module
    (default: an hour); ``GATEWAY_ARGS`` of the module: extra ``l2crypt-gateway run``
    options per gateway."""
    skip_unless_gateway_lab()
    the_lab = GatewayLab(tmp_path_factory.mktemp("gwlab"),
                         netkey_rekey_after_s=getattr(request.module, "NETKEY_REKEY_S", 3600.0),
                         gateway_args=getattr(request.module, "GATEWAY_ARGS", None))
    try:
        the_lab.up(timeout_s=150)
        yield the_lab
    finally:
        the_lab.down()

"""Operating the gateway: its metrics read the core's counters at scrape time,
``l2crypt-gateway status`` prints tables and JSON, ``check-config`` names every
problem with its key."""

import asyncio
import json
import socket
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from gateway import core as C
from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.daemon import Gateway, GatewayKeyClient
from gateway.metrics import gateway_metrics
from gateway.ports import TunnelPorts
from gateway.status_view import rates, render_status
from keyserverd.ca import CertificateAuthority
from l2crypt.agent.tls_files import CA_CERT, HOST_CERT, HOST_KEY
from l2crypt.ops.control import serve_control
from l2crypt.ops.metrics import FunctionCollector, new_registry
from test_gateway_core import GA, GB, H1, MCAST_A, NETKEY, P1, arp, gateway, host, link_keys_of, serve_netkey
from test_keyserver_tls import new_identity
from test_port_guard import listing_of

NEW_NETKEY = b"L" * 32


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                          if s.labels else "")] = s.value
    return out


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enrolled_state_dir(tmp_path, gw_id="gA"):
    """A state directory as ``l2crypt enroll`` leaves it: key, certificate (CN gw_id), CA."""
    ca = CertificateAuthority.open(tmp_path / "ca", ())
    state = tmp_path / "state"
    state.mkdir()
    key_path, csr = new_identity(state, gw_id)
    key_path.rename(state / HOST_KEY)
    (state / HOST_CERT).write_bytes(ca.sign_csr(csr, gw_id))
    (state / CA_CERT).write_bytes(ca.ca_cert_pem)
    return state


def real_gateway(tmp_path, core) -> Gateway:
    """A ``daemon.Gateway`` made from its config and enrolled state directory,
    with ``core`` as its core, its real tunnel socket on loopback (gB at
    127.0.0.2) and its real key client (not started: no key server runs).
    Only the nftables listing its port guards read stands in for the kernel's
    (the lab's netns_tests/test_inbound_guard.py reads the kernel's)."""
    config = GatewayConfig(encrypted_port="eth0", plain_port="plain0", servers=("127.0.0.1:9", "127.0.0.1:10"),
                           state_dir=str(enrolled_state_dir(tmp_path)),
                           tunnel_listen=f"127.0.0.1:{free_udp_port()}", tunnel_peers=("gB=127.0.0.2:4789",))
    gw = Gateway(config)
    gw.core = core
    gw.tunnel = TunnelPorts(config.path_specs())
    gw.client = GatewayKeyClient(config.servers, gw.ssl_ctx, core.gw_mac, gw)
    enc, plain = gw.guards["encrypted"], gw.guards["plain"]
    gw.guard_readings = lambda: {"encrypted": enc.reading(listing_of(enc, packets=9)), "plain": plain.reading(None)}
    return gw


@pytest.fixture
def real_gw(tmp_path, traffic):
    """The traffic fixture's gA inside a real Gateway, after three datagrams
    from a stranger and one (truncated) from gB reached its tunnel socket."""
    gw = real_gateway(tmp_path, traffic[0])
    gw._loop = asyncio.new_event_loop()
    sock = gw.tunnel.sockets[0]
    port = int(gw.config.tunnel_listen.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer_b:
        stranger.bind(("127.0.0.1", 0))
        peer_b.bind(("127.0.0.2", 0))
        for _ in range(3):
            stranger.sendto(b"\x01\x01" + bytes(40), ("127.0.0.1", port))
        peer_b.sendto(b"\x01\x01" + bytes(10), ("127.0.0.1", port))
        gw._on_tunnel(sock)
    # The key client's selector goes through a failover: ks1 in use, lost, ks2 in use.
    gw.client.selector.connected(0, 1.0)
    gw.client.selector.lost(2.0)
    gw.client.selector.connected(1, 2.5)
    yield gw
    gw.tunnel.close()
    gw._loop.close()


def scrape(gw, now=10.0) -> tuple[dict, str]:
    registry = new_registry()
    registry.register(FunctionCollector(lambda: gateway_metrics(gw, now)))
    text = generate_latest(registry).decode()
    return samples(text), text


@pytest.fixture
def traffic():
    """gA (plain port, tunnel to gB) after p1 and h1 talked, and a bad datagram arrived."""
    h1 = host(H1)
    ga, gb = gateway(GA, peers=("gB",)), gateway(GB, peers=("gA",), plain=False)
    for gw, gw_id in ((ga, "gA"), (gb, "gB")):
        gw.install_multicast_key(MCAST_A, 1, 0.0)
        serve_netkey(gw, gw_id)
    ga.from_plain(arp(P1), 0.1)  # learned, held, mapped, sealed onto the segment
    assert len(ga.on_mapped(P1, C.PLAIN, 0.2).to_enc) == 1
    out = ga.from_encrypted(h1.seal_from_tap(arp(H1), 1.0), 1.0)  # to the plain side and the tunnel
    assert len(out.to_plain) == 1 and len(out.to_tunnel) == 1
    gb.from_tunnel("gA", out.to_tunnel[0][2], 1.1)
    assert gb.tunnel.counters["tunnel_opened"] == 1
    ga.from_tunnel("gB", b"\x01\x01" + bytes(10), 1.2)  # truncated
    serve_netkey(ga, "gA", NEW_NETKEY, 2, 1.5)
    return ga, gb


def test_metrics_read_the_gateways_counters(real_gw):
    m, text = scrape(real_gw, now=11.0)
    assert m["l2crypt_gateway_frames_sealed_total{port=encrypted}"] == 1  # p1's ARP onto the segment
    assert m["l2crypt_gateway_frames_opened_total{port=encrypted}"] == 1  # h1's ARP
    assert m["l2crypt_gateway_frames_sealed_total{port=tunnel}"] == 2  # both ARPs, to gB
    assert m["l2crypt_gateway_frames_opened_total{port=tunnel}"] == 0
    assert m["l2crypt_gateway_bytes_sealed_total{port=tunnel}"] == len(arp(P1)) + len(arp(H1))
    assert m["l2crypt_gateway_bytes_opened_total{port=encrypted}"] == len(arp(H1))
    assert m["l2crypt_gateway_plain_frames_total{direction=in}"] == 1
    assert m["l2crypt_gateway_plain_frames_total{direction=out}"] == 1
    assert m["l2crypt_gateway_plain_bytes_total{direction=out}"] == len(arp(H1))
    assert m["l2crypt_gateway_frames_dropped_total{reason=tunnel_truncated}"] == 2  # the fixture's, and gB's by UDP
    assert m["l2crypt_gateway_frames_dropped_total{reason=tunnel_unknown_sender}"] == 3
    assert m["l2crypt_gateway_rekeys_total{key=netkey}"] == 1
    assert m["l2crypt_gateway_netkey_pw_id"] == 1  # version 2 waits for the switch delay
    assert m["l2crypt_gateway_netkey_age_seconds"] == 11.0
    assert m["l2crypt_gateway_macs{side=plain,state=mapped}"] == 1
    assert m["l2crypt_gateway_macs_learned_total"] == 1
    assert m["l2crypt_gateway_map_requests_total"] == 0  # nobody took them in this test
    assert m["l2crypt_gateway_keyserver_connected"] == 0  # the client never ran
    assert m["l2crypt_gateway_keyserver_connects_total"] == 0
    assert m["l2crypt_gateway_keyserver_failovers_total"] == 1
    assert m["l2crypt_gateway_keyserver_failbacks_total"] == 0
    assert m["l2crypt_key_request_duration_seconds_count"] == 0
    assert m["l2crypt_gateway_port_guard_frames_dropped_total{direction=inbound,port=encrypted}"] == 9
    assert m["l2crypt_gateway_port_guard_frames_dropped_total{direction=egress,port=encrypted}"] == 9
    assert m["l2crypt_gateway_port_guard_intact{port=encrypted}"] == 1
    assert m["l2crypt_gateway_port_guard_intact{port=plain}"] == 0
    assert m["l2crypt_gateway_datapath_info{path=simple,port=encrypted,reason=not opened yet}"] == 1
    assert m["l2crypt_gateway_datapath_info{path=simple,port=plain,reason=configured}"] == 1
    assert not [k for k in m if k.startswith("l2crypt_gateway_port_guard_frames_dropped_total") and "plain" in k]
    assert m[f"l2crypt_gateway_info{{cipher=aes-256-gcm,encrypted_port=eth0,id=gA,mac={C.frame_wire.format_mac(GA)},"
             f"plain_port=plain0}}"] == 1
    for secret in (NETKEY, NEW_NETKEY, MCAST_A, *link_keys_of("gA", "gB"), *link_keys_of("gA", "gB", NEW_NETKEY, 2)):
        assert secret.hex() not in text and secret.decode("latin-1") not in text


def test_metrics_move_and_name_no_key(real_gw):
    ga = real_gw.core
    before, _ = scrape(real_gw)
    ga.from_tunnel("gB", b"\x09" * 60, 2.0)  # unknown version
    ga.from_tunnel("stranger", b"\x01" * 60, 2.0)
    after, text = scrape(real_gw)
    assert after["l2crypt_gateway_frames_dropped_total{reason=tunnel_unknown_version}"] == 1
    assert after["l2crypt_gateway_frames_dropped_total{reason=tunnel_unknown_peer}"] == 1
    assert "tunnel_unknown_version" not in str(before)
    for secret in (NETKEY, NEW_NETKEY, MCAST_A):
        assert secret.hex() not in text and secret.hex().upper() not in text


def test_no_metrics_before_the_core_exists(tmp_path):
    gw = Gateway(GatewayConfig(encrypted_port="eth0", servers=("127.0.0.1:9",),
                               state_dir=str(enrolled_state_dir(tmp_path))))
    assert gw.core is None and gateway_metrics(gw, 0.0) == []


# --- status -------------------------------------------------------------------------


def status_doc(gw) -> dict:
    """The real Gateway's snapshot, as it comes over the control socket."""
    return json.loads(json.dumps(gw.snapshot()))


def test_status_renders_tables(real_gw):
    console = Console(record=True, width=140)
    render_status(status_doc(real_gw), console)
    text = console.export_text()
    assert "gateway gA" in text and "key server: none  DISCONNECTED" in text
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") >= 6}
    assert [c.strip() for c in lines["encrypted"].split("│")[2:5]] == ["eth0", "1", "1"]
    assert [c.strip() for c in lines["plain"].split("│")[2:5]] == ["plain0", "1", "1"]
    assert [c.strip() for c in lines["tunnel"].split("│")[2:5]] == [real_gw.config.tunnel_listen, "0", "2"]
    assert C.frame_wire.format_mac(P1) in text and "mapped" in text
    assert "tunnel_truncated=2" in text and "tunnel_unknown_sender=3" in text
    assert "NETKEY PW_ID: 1 (held 1, 2)" in text
    assert "port guard on eth0: intact   frames refused inbound: 9   frames blocked outbound: 9" in text
    assert "port guard on plain0: MISSING (plain frames pass)" in text
    assert "encrypted port path: simple: not opened yet" in text
    assert "plain port path: simple (configured)" in text
    assert "tunnel path: simple: not asked for" in text


def test_watch_rates_per_port(real_gw):
    before = status_doc(real_gw)
    after = json.loads(json.dumps(before))
    after["counters"]["tunnel_sealed"] = before["counters"]["tunnel_sealed"] + 20
    after["counters"]["from_plain_bytes"] = before["counters"]["from_plain_bytes"] + 3000
    after["drops"]["tunnel_bad_tag"] = 4
    r = rates(before, after, 2.0)
    assert r["ports"]["tunnel"]["frames_out_per_s"] == 10.0
    assert r["ports"]["plain"]["bytes_in_per_s"] == 1500.0
    assert r["ports"]["encrypted"]["frames_in_per_s"] == 0.0
    assert r["drops_per_s"] == 2.0


@pytest.fixture
def control_socket(real_gw):
    """The real Gateway answering ``status`` on state_dir/gateway.sock
    (``l2crypt.ops.control.serve_control`` with ``Gateway.snapshot``), on its own loop."""
    ready, done = threading.Event(), None

    def serve():
        nonlocal done
        loop = real_gw._loop
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve_control(real_gw.config.socket_path, real_gw.snapshot))
        done = asyncio.Event()
        ready.set()
        loop.run_until_complete(done.wait())
        server.close()
        loop.run_until_complete(server.wait_closed())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield real_gw
    real_gw._loop.call_soon_threadsafe(done.set)
    thread.join(timeout=5)


def run(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_status_command_json_and_table(control_socket, capsys, monkeypatch):
    gw = control_socket
    state_dir = gw.config.state_dir
    monkeypatch.setenv("COLUMNS", "140")
    code, out, err = run(capsys, "status", "--state-dir", str(state_dir), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["id"] == "gA" and doc["connected"] is False and doc["keyserver"] is None
    assert doc["counters"]["tunnel_sealed"] == 2 and doc["drops"]["tunnel_truncated"] == 2
    assert doc["tunnel_unknown_sender"] == 3 and doc["tunnel_listen"] == gw.config.tunnel_listen
    assert (doc["port_guard"], doc["inbound_refused"], doc["plain_port_guard"]) == ("intact", 9, "missing")
    assert [(e["mac"], e["side"], e["state"]) for e in doc["learned"]] == [
        (C.frame_wire.format_mac(P1), "plain", "mapped")]
    code, out, err = run(capsys, "status", "--state-dir", str(state_dir))
    assert code == 0 and "ports" in out and "learned MACs" in out and "eth0" in out and not out.lstrip().startswith("{")


def test_status_without_a_gateway_is_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("l2crypt-gateway: error: no gateway is running here") and "Traceback" not in err


# --- check-config -------------------------------------------------------------------

OK = 'encrypted_port = "eth0"\nservers = ["192.0.2.1:7788"]\n'
MISTAKES = {
    "missing key": ('servers = ["192.0.2.1:7788"]\n', "encrypted_port", "missing"),
    "wrong type": (OK + 'max_learned_macs = "many"\n', "max_learned_macs", "want an integer"),
    "unknown key": (OK + 'colour = "blue"\n', "colour", "unknown key"),
    "bad address": (OK + 'tunnel_listen = "10.0.0.1:99999"\n', "tunnel_listen", "bad port"),
    "bad peer address": (OK + 'tunnel_listen = "10.0.0.1:4789"\ntunnel_peers = ["gB=10.0.0.2"]\n', "tunnel_peers",
                         "needs a port"),
    "bad metrics address": (OK + 'metrics_listen = "nowhere:80"\n', "metrics_listen", "not an IP"),
    "peers without a tunnel port": (OK + 'tunnel_peers = ["gB=10.0.0.2:4789"]\n', "tunnel_listen", "missing"),
    "plain port is the encrypted port": (OK + 'plain_port = "eth0"\n', "plain_port", "must differ"),
}


@pytest.mark.parametrize("kind", MISTAKES)
def test_check_config_names_the_key(tmp_path, capsys, kind):
    text, key, words = MISTAKES[kind]
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"l2crypt-gateway: {path}: {key}: ") and words in lines[0], lines[0]
    # The gateway refuses to start on it, naming the same key: one line, exit 2.
    code, out, err = run(capsys, "run", "--config", str(path))
    assert code == 2 and f": {key}: " in err and err.count("\n") == 1 and "Traceback" not in err


def test_check_config_names_every_problem(tmp_path, capsys):
    path = tmp_path / "gateway.toml"
    path.write_text('encrypted_port = 7\nhold_age_s = "soon"\ncolour = 1\nservers = ["a:b"]\n'
                    'group_crossing = "some"\ntunnel_peers = ["gB=10.0.0.2:4789"]\n')
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 2
    keys = sorted(line.split(": ")[2] for line in err.splitlines())
    assert keys == ["colour", "encrypted_port", "group_crossing", "hold_age_s", "servers", "tunnel_listen"], err


def test_check_config_accepts_a_good_file_and_names_a_missing_one(tmp_path, capsys):
    path = tmp_path / "gateway.toml"
    path.write_text(OK + 'plain_port = "eth1"\ntunnel_listen = "10.0.0.1:4789"\ntunnel_peers = ["gB=10.0.0.2:4789"]\n'
                    'metrics_listen = ""\n')
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out.strip(), err) == (0, f"{path}: ok", "")
    code, out, err = run(capsys, "check-config", str(tmp_path / "nope.toml"))
    assert code == 2 and "no such config file" in err and err.count("\n") == 1

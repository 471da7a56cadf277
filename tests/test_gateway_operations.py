"""Operating the gateway: its metrics read the core's counters at scrape time,
``l2crypt-gateway status`` prints tables and JSON, ``check-config`` names every
problem with its key."""

import json
import socket
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from gateway import core as C
from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.metrics import gateway_metrics
from gateway.status_view import rates, render_status
from l2crypt.metrics import FunctionCollector, LatencyHistogram, new_registry
from test_gateway_core import GA, GB, H1, MCAST_A, NETKEY, P1, arp, gateway, host, link_keys_of, serve_netkey

NEW_NETKEY = b"L" * 32


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                          if s.labels else "")] = s.value
    return out


def fake_gateway(core, unknown_sender=0):
    latency = LatencyHistogram("l2crypt_key_request_duration_seconds", "Key request to answer.")
    latency.observe(0.004)
    client = SimpleNamespace(connected=True, connects=2, latency=latency,
                             selector=SimpleNamespace(failovers=1, failbacks=0))
    guards = {"encrypted": {"port_guard": "intact", "inbound_refused": 9, "egress_blocked": 2},
              "plain": {"port_guard": "missing", "inbound_refused": None}}
    return SimpleNamespace(core=core, client=client, gw_id="gA", tunnel=SimpleNamespace(unknown_sender=unknown_sender),
                           config=GatewayConfig(encrypted_port="eth0", plain_port="plain0", servers=("10.0.0.1:7788",)),
                           guard_readings=lambda: guards)


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
    gb.from_tunnel("gA", out.to_tunnel[0][1], 1.1)
    assert gb.tunnel.counters["tunnel_opened"] == 1
    ga.from_tunnel("gB", b"\x01\x01" + bytes(10), 1.2)  # truncated
    serve_netkey(ga, "gA", NEW_NETKEY, 2, 1.5)
    return ga, gb


def test_metrics_read_the_gateways_counters(traffic):
    ga, _ = traffic
    m, text = scrape(fake_gateway(ga, unknown_sender=3), now=11.0)
    assert m["l2crypt_gateway_frames_sealed_total{port=encrypted}"] == 1  # p1's ARP onto the segment
    assert m["l2crypt_gateway_frames_opened_total{port=encrypted}"] == 1  # h1's ARP
    assert m["l2crypt_gateway_frames_sealed_total{port=tunnel}"] == 2  # both ARPs, to gB
    assert m["l2crypt_gateway_frames_opened_total{port=tunnel}"] == 0
    assert m["l2crypt_gateway_bytes_sealed_total{port=tunnel}"] == len(arp(P1)) + len(arp(H1))
    assert m["l2crypt_gateway_bytes_opened_total{port=encrypted}"] == len(arp(H1))
    assert m["l2crypt_gateway_plain_frames_total{direction=in}"] == 1
    assert m["l2crypt_gateway_plain_frames_total{direction=out}"] == 1
    assert m["l2crypt_gateway_plain_bytes_total{direction=out}"] == len(arp(H1))
    assert m["l2crypt_gateway_frames_dropped_total{reason=tunnel_truncated}"] == 1
    assert m["l2crypt_gateway_frames_dropped_total{reason=tunnel_unknown_sender}"] == 3
    assert m["l2crypt_gateway_rekeys_total{key=netkey}"] == 1
    assert m["l2crypt_gateway_netkey_pw_id"] == 1  # version 2 waits for the switch delay
    assert m["l2crypt_gateway_netkey_age_seconds"] == 11.0
    assert m["l2crypt_gateway_macs{side=plain,state=mapped}"] == 1
    assert m["l2crypt_gateway_macs_learned_total"] == 1
    assert m["l2crypt_gateway_map_requests_total"] == 0  # nobody took them in this test
    assert m["l2crypt_gateway_keyserver_connected"] == 1
    assert m["l2crypt_gateway_keyserver_failovers_total"] == 1
    assert m["l2crypt_key_request_duration_seconds_count"] == 1
    assert m["l2crypt_gateway_port_guard_frames_dropped_total{direction=inbound,port=encrypted}"] == 9
    assert m["l2crypt_gateway_port_guard_frames_dropped_total{direction=egress,port=encrypted}"] == 2
    assert m["l2crypt_gateway_port_guard_intact{port=encrypted}"] == 1
    assert m["l2crypt_gateway_port_guard_intact{port=plain}"] == 0
    assert not [k for k in m if k.startswith("l2crypt_gateway_port_guard_frames_dropped_total") and "plain" in k]
    assert m[f"l2crypt_gateway_info{{cipher=aes-256-gcm,encrypted_port=eth0,id=gA,mac={C.frame_wire.format_mac(GA)},"
             f"plain_port=plain0}}"] == 1
    for secret in (NETKEY, NEW_NETKEY, MCAST_A, *link_keys_of("gA", "gB"), *link_keys_of("gA", "gB", NEW_NETKEY, 2)):
        assert secret.hex() not in text and secret.decode("latin-1") not in text


def test_metrics_move_and_name_no_key(traffic):
    ga, _ = traffic
    before, _ = scrape(fake_gateway(ga))
    ga.from_tunnel("gB", b"\x09" * 60, 2.0)  # unknown version
    ga.from_tunnel("stranger", b"\x01" * 60, 2.0)
    after, text = scrape(fake_gateway(ga))
    assert after["l2crypt_gateway_frames_dropped_total{reason=tunnel_unknown_version}"] == 1
    assert after["l2crypt_gateway_frames_dropped_total{reason=tunnel_unknown_peer}"] == 1
    assert "tunnel_unknown_version" not in str(before)
    for secret in (NETKEY, NEW_NETKEY, MCAST_A):
        assert secret.hex() not in text and secret.hex().upper() not in text


def test_no_metrics_before_the_core_exists():
    gw = fake_gateway(None)
    assert gateway_metrics(gw, 0.0) == []


# --- status -------------------------------------------------------------------------


def status_doc(core, now=5.0) -> dict:
    doc = core.snapshot(now)
    doc.update({"id": "gA", "role": "gateway", "mac": C.frame_wire.format_mac(core.gw_mac), "encrypted_port": "eth0",
                "plain_port": "plain0", "tunnel_listen": "10.69.1.1:4789", "tunnel_unknown_sender": 0,
                "keyserver": "10.67.0.1:7788", "connected": True, "uptime_s": 12.5,
                "port_guard": "intact", "inbound_refused": 9, "egress_blocked": 0,
                "plain_port_guard": "missing", "plain_inbound_refused": None})
    return json.loads(json.dumps(doc))  # as it comes over the control socket


def test_status_renders_tables(traffic):
    ga, _ = traffic
    console = Console(record=True, width=140)
    render_status(status_doc(ga), console)
    text = console.export_text()
    assert "gateway gA" in text and "10.67.0.1:7788  connected" in text
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") >= 6}
    assert [c.strip() for c in lines["encrypted"].split("│")[2:5]] == ["eth0", "1", "1"]
    assert [c.strip() for c in lines["plain"].split("│")[2:5]] == ["plain0", "1", "1"]
    assert [c.strip() for c in lines["tunnel"].split("│")[2:5]] == ["10.69.1.1:4789", "0", "2"]
    assert C.frame_wire.format_mac(P1) in text and "mapped" in text
    assert "tunnel_truncated=1" in text and "NETKEY PW_ID: 1 (held 1, 2)" in text
    assert "port guard on eth0: intact   frames refused inbound: 9   frames blocked outbound: 0" in text
    assert "port guard on plain0: MISSING (plain frames pass)" in text


def test_watch_rates_per_port(traffic):
    ga, _ = traffic
    before = status_doc(ga)
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
def control_socket(tmp_path, traffic):
    """A stand-in gateway answering ``status`` on state_dir/gateway.sock."""
    doc = status_doc(traffic[0])
    path = tmp_path / "gateway.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(10)

    def serve():
        for _ in range(2):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(256)
                conn.sendall(json.dumps(doc).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield tmp_path, doc
    srv.close()
    thread.join(timeout=5)


def run(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_status_command_json_and_table(control_socket, capsys, monkeypatch):
    state_dir, doc = control_socket
    monkeypatch.setenv("COLUMNS", "140")
    code, out, err = run(capsys, "status", "--state-dir", str(state_dir), "--json")
    assert code == 0 and json.loads(out) == doc
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

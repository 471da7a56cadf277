"""Claims on a MAC or an IP (issue 15, finding 5), over the key service with real SQLite:

    gateway gw maps a plain-side MAC  --  host c (added without --mac) later says hello with it
    host a (pinned MAC)  /  host with pinned IPs (host add --ip)  /  a MAC held at a peered server

- an enrolled host's hello wins over a gateway mapping: the mapping is dropped,
  the gateway is told (``unmapped``), and the host's pairs never carry the
  gateway's key under that MAC;
- ``require_pinned_macs``: a host added without ``--mac`` cannot bind one
  (``mac_not_pinned``); ``require_pinned_ips`` (the default): a layer-3 host
  binds only its pinned addresses (``ip_not_pinned``);
- with peering, a map_req or a first hello for a MAC that a peered server's
  host holds is refused (``mac_held_by_peer``), over real mutual TLS.
"""

import asyncio

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.client_port import make_server_ssl_context
from keyserverd.server import KeyServer
from keyserverd.service import KeyService, Session
from keyserverd.store.protocol import KeyEvent
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.core.ks_messages import encode_message
from test_keyserver_cli import run as run_cli
from test_keyserver_tls import Client, new_identity
from test_peering import Side, make_peering, pinned

NOW = 1_700_000_000.0
MAC_A = bytes.fromhex("020000000001")
MAC_C = bytes.fromhex("02000000000c")  # c's TAP MAC: c is enrolled but not connected yet
MAC_GW = bytes.fromhex("0200000000aa")
IP_1, IP_2 = bytes([10, 71, 0, 2]), bytes([10, 71, 0, 3])


def make_service(tmp_path, **policy):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    store.add_host("a", MAC_A, "host", hash_token("t"), NOW + 60, NOW)
    store.add_host("c", None, "host", hash_token("t"), NOW + 60, NOW)
    store.add_host("gw", None, "gateway", hash_token("t"), NOW + 60, NOW)
    return KeyService(store, "aes-256-gcm", "ks-test", ca, **policy), store


@pytest.fixture
def env(tmp_path):
    service, store = make_service(tmp_path)
    yield service, store
    store.close()


def call(service, session, msg, now=NOW):
    actions = service.handle(session, msg, now)
    for target, out in actions:
        if target != "close":
            encode_message(out)  # every answer is a valid wire message
    return actions


def reply(actions):
    [r] = [m for t, m in actions if t == "reply"]
    return r


def hello(service, host_id, mac):
    session = Session(identity=host_id, peer=f"{host_id}:1")
    return session, call(service, session, {"t": "hello", "rid": 1, "mac": mac})


# --- a host's hello wins over a gateway mapping -------------------------------------------


def test_a_hosts_hello_takes_its_mac_from_a_gateway_and_tells_the_gateway(env):
    service, store = env
    a, _ = hello(service, "a", MAC_A)
    gw, _ = hello(service, "gw", MAC_GW)
    # A plain-side host spoofs c's MAC before c ever connected: the gateway gets it (c's MAC is unknown).
    assert reply(call(service, gw, {"t": "map_req", "rid": 2, "mac": MAC_C, "side": "plain"}))["t"] == "mapped"
    before = reply(call(service, a, {"t": "key_req", "rid": 3, "peer_mac": MAC_C}))
    assert before["peer_id"] == "gw"  # the presence: the mapping worked
    # c connects: its claim wins.
    c, actions = hello(service, "c", MAC_C)
    assert reply(actions)["t"] == "welcome" and store.host_by_mac(MAC_C).id == "c"
    assert (("push", "gw"), {"t": "unmapped", "rid": 0, "mac": MAC_C}) in actions
    assert service.macs.owner(MAC_C) is None
    assert [m for t, m in call(service, gw, {"t": "map_list", "rid": 4}) if t == "reply"] == []
    # The gateway cannot take it back.
    again = reply(call(service, gw, {"t": "map_req", "rid": 5, "mac": MAC_C, "side": "plain"}))
    assert again["code"] == "mac_bound"
    # a's key for c's MAC is now the pair with c, never the gateway's.
    now_key = reply(call(service, a, {"t": "key_req", "rid": 6, "peer_mac": MAC_C}))
    assert now_key["peer_id"] == "c" and now_key["key"] != before["key"]


def test_after_the_claim_a_gateway_rotation_never_pushes_the_gateways_key_under_the_hosts_mac(env):
    service, store = env
    a, _ = hello(service, "a", MAC_A)
    gw, _ = hello(service, "gw", MAC_GW)
    reply(call(service, gw, {"t": "map_req", "rid": 2, "mac": MAC_C, "side": "plain"}))
    call(service, a, {"t": "key_req", "rid": 3, "peer_mac": MAC_C})  # pair (a, gw) exists
    hello(service, "c", MAC_C)
    pw_id = store.rotate_pair_key("a", "gw", NOW + 1)
    pushes = service.on_event(KeyEvent(1, "pair", "a", "gw", pw_id))
    to_a = [m for t, m in pushes if t == ("push", "a")]
    assert to_a and all(m["peer_id"] == "gw" for m in to_a)  # a still gets the gateway's own key
    assert not [m for m in to_a if m["peer_mac"] == MAC_C], "a would seal c's frames with the gateway's key"


def test_a_gateway_may_not_map_a_mac_reserved_for_a_host_waiting_to_enroll(env):
    service, store = env
    store.add_host("w", bytes.fromhex("02000000000d"), "host", hash_token("t"), NOW + 60, NOW)
    gw, _ = hello(service, "gw", MAC_GW)
    err = reply(call(service, gw, {"t": "map_req", "rid": 2, "mac": bytes.fromhex("02000000000d"),
                                   "side": "plain"}))
    assert err["code"] == "mac_bound"
    ok = reply(call(service, gw, {"t": "map_req", "rid": 3, "mac": bytes.fromhex("02000000000e"), "side": "plain"}))
    assert ok["t"] == "mapped"


# --- pinning policies --------------------------------------------------------------------------


def test_require_pinned_macs_refuses_a_host_added_without_mac(tmp_path):
    service, store = make_service(tmp_path, require_pinned_macs=True)
    try:
        _, actions = hello(service, "c", MAC_C)
        err = reply(actions)
        assert (err["t"], err["code"]) == ("error", "mac_not_pinned") and "host add --mac" in err["msg"]
        assert store.get_host("c").mac is None  # nothing was bound
        _, actions = hello(service, "a", MAC_A)  # the pinned one binds
        assert reply(actions)["t"] == "welcome"
        _, actions = hello(service, "a", MAC_C)  # and only its pinned MAC
        assert reply(actions)["code"] == "mac_conflict"
    finally:
        store.close()


def test_without_the_policy_a_first_hello_binds_for_good(env):
    service, store = env
    assert reply(hello(service, "c", MAC_C)[1])["t"] == "welcome"
    assert reply(hello(service, "c", bytes.fromhex("02000000000f"))[1])["code"] == "mac_conflict"


def l3(service, host_id):
    session = Session(identity=host_id)
    assert reply(call(service, session, {"t": "l3_hello", "rid": 1}))["t"] == "l3_welcome"
    return session


def test_by_default_a_layer3_host_binds_only_its_pinned_addresses(env):
    service, store = env
    store.bind_ip("a", IP_1)  # what `keyserverd host add a --ip 10.71.0.2` does
    a, c = l3(service, "a"), l3(service, "c")
    assert reply(call(service, a, {"t": "ip_bind", "rid": 2, "ip": IP_1}))["t"] == "ip_bound"
    err = reply(call(service, a, {"t": "ip_bind", "rid": 3, "ip": IP_2}))
    assert (err.get("code"), "host add --ip" in err.get("msg", "")) == ("ip_not_pinned", True)
    # Nobody claims another host's pinned address, even before that host connects.
    assert reply(call(service, c, {"t": "ip_bind", "rid": 4, "ip": IP_1})).get("code") == "ip_not_pinned"
    assert store.ips_of("a") == [IP_1] and store.ips_of("c") == []


def test_host_add_ip_pins_addresses_and_refuses_taken_ones(capsys, tmp_path):
    code, out, err = run_cli(capsys, "--state-dir", str(tmp_path), "host", "add", "l3-1",
                             "--ip", "10.71.0.2", "--ip", "10.71.0.3")
    assert code == 0, err
    assert "ip 10.71.0.2, ip 10.71.0.3" in out
    code, _, err = run_cli(capsys, "--state-dir", str(tmp_path), "host", "add", "l3-2", "--ip", "10.71.0.3")
    assert code == 1 and "10.71.0.3 is already bound to host 'l3-1'" in err
    code, _, err = run_cli(capsys, "--state-dir", str(tmp_path), "host", "add", "l3-3", "--ip", "224.0.0.1")
    assert code == 2 and "--ip" in err
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    try:
        assert store.ips_of("l3-1") == [IP_1, IP_2]
        assert store.get_host("l3-2") is None and store.get_host("l3-3") is None
    finally:
        store.close()


# --- MACs held at a peered key server ------------------------------------------------------


def test_with_peering_map_req_and_a_first_hello_wait_for_the_peers(env):
    service, store = env
    service.peering_enabled = True
    gw = Session(identity="gw")  # peer check before the first binding ...
    [(target, req)] = service.handle(gw, {"t": "hello", "rid": 1, "mac": MAC_GW}, NOW)
    assert target == ("peer_check", "hello") and req == {"rid": 1, "mac": MAC_GW}
    assert gw.bound_mac is None and store.get_host("gw").mac is None
    assert reply(service.after_peer_check(gw, "hello", req, None, NOW))["t"] == "welcome"
    assert gw.bound_mac == MAC_GW
    a, actions = hello(service, "a", MAC_A)  # ... but not for a pinned MAC
    assert reply(actions)["t"] == "welcome"
    [(target, req)] = service.handle(gw, {"t": "map_req", "rid": 2, "mac": MAC_C, "side": "plain"}, NOW)
    assert target == ("peer_check", "map")
    err = reply(service.after_peer_check(gw, "map", req, (None, {"t": "resolved", "id": "b1", "mac": MAC_C}), NOW))
    assert err["code"] == "mac_held_by_peer" and service.macs.owner(MAC_C) is None
    assert reply(service.after_peer_check(gw, "map", req, None, NOW))["t"] == "mapped"
    # A MAC already mapped to this gateway (a re-announcement) needs no new lookup.
    assert reply(call(service, gw, {"t": "map_req", "rid": 3, "mac": MAC_C, "side": "plain"}))["t"] == "mapped"


@pytest.fixture
def peered(tmp_path):
    """KS-A (hosts a1, a2 unpinned, gateway gw) peered over mutual TLS with KS-B (host b1)."""
    from test_peering import MAC_A1, MAC_B1
    a, b = Side(tmp_path, "ks-a", "a1", MAC_A1), Side(tmp_path, "ks-b", "b1", MAC_B1)
    a.store.add_host("a2", None, "host", b"x" * 32, 4e9, NOW)
    a.store.add_host("agw", None, "gateway", b"x" * 32, 4e9, NOW)  # in KS-A's namespace (a*) at KS-B
    files = {}
    for host_id in ("a2", "agw"):
        key_path, csr = new_identity(tmp_path, host_id)
        cert_path = tmp_path / f"{host_id}.crt"
        cert_path.write_bytes(a.ca.sign_csr(csr, host_id, role=a.store.get_host(host_id).role))
        files[host_id] = (cert_path, key_path)
    yield a, b, files, MAC_B1
    a.store.close()
    b.store.close()


def test_a_mac_held_at_a_peered_server_is_neither_mapped_nor_bound(peered):
    a, b, files, mac_b1 = peered

    async def body():
        pa, pb = make_peering(a, b), make_peering(b, a)
        server = KeyServer(a.service, make_server_ssl_context(a.ca), "127.0.0.1", 0)
        server.peering = pa
        await pa.start()
        await pb.start()
        _, port = await server.start()
        clients = []
        try:
            await pinned(pa)
            await pinned(pb)
            gw = await Client.connect(port, a.ca.ca_cert_pem, files["agw"])
            a2 = await Client.connect(port, a.ca.ca_cert_pem, files["a2"])
            clients += [gw, a2]
            assert (await gw.call({"t": "hello", "rid": 1, "mac": MAC_GW}))["t"] == "welcome"
            # b1's MAC, seen on gw's plain side: KS-B's host holds it.
            err = await gw.call({"t": "map_req", "rid": 2, "mac": mac_b1, "side": "plain"})
            assert (err["t"], err.get("code")) == ("error", "mac_held_by_peer"), err
            free = bytes.fromhex("025000000001")
            assert (await gw.call({"t": "map_req", "rid": 3, "mac": free, "side": "plain"}))["t"] == "mapped"
            # a2 (no pinned MAC) says hello with b1's MAC: refused, nothing bound.
            err = await a2.call({"t": "hello", "rid": 1, "mac": mac_b1})
            assert err.get("code") == "mac_held_by_peer", err
            assert a.store.get_host("a2").mac is None
            assert (await a2.call({"t": "hello", "rid": 2, "mac": bytes.fromhex("020000000a02")}))["t"] == "welcome"
        finally:
            for c in clients:
                c.close()
            await server.close()
            await pa.close()
            await pb.close()

    asyncio.run(asyncio.wait_for(body(), 60))

"""The agent and the gateway drop every host a welcome names as revoked
(issue 15, finding 2: ``on_welcome`` did not resync revocations).

    h2 --sealed--> h1's agent (on_welcome)      h2 --sealed--> gateway gA (on_welcome)

Real engines; the daemons' ``on_welcome`` runs on a stand-in for the rest of
the daemon (no TAP, no sockets)."""

import types
from types import SimpleNamespace

from gateway.daemon import Gateway
from l2crypt.agent.agent import Agent
from l2crypt.agent.engine_driver import EngineDriver
from l2crypt.core.engine import REVOKED_SENDER, EngineSettings, FrameEngine
from test_gateway_core import GA, H1, MCAST_A, arp, frame, gateway, host, pair_key

H2 = bytes.fromhex("024c32000012")
H3 = bytes.fromhex("024c32000013")


def welcome(revoked: bytes) -> dict:
    return {"t": "welcome", "rid": 1, "id": "x", "mac": H1, "cipher": "aes-256-gcm",
            "multicast_key": MCAST_A, "multicast_pw_id": 1, "server": "ks", "key_max_age_s": 7200,
            "revoked_macs": revoked}


def sealed_by_h2(to: bytes, now: float) -> bytes:
    h2 = host(H2)
    out = h2.install_pair_key(to, "peer", pair_key("h2", "peer"), 1, now)
    assert out.to_wire == []
    return h2.seal_from_tap(frame(to, H2), now)


def stand_in(cls, **attrs):
    """An object with ``attrs`` whose ``on_peer_revoked`` is the daemon's own."""
    ns = SimpleNamespace(_loop=SimpleNamespace(time=lambda: 5.0), **attrs)
    ns.on_peer_revoked = types.MethodType(cls.on_peer_revoked, ns)
    return ns


def test_the_agent_drops_hosts_named_in_the_welcome():
    engine = FrameEngine(H1, EngineSettings())
    engine.install_pair_key(H2, "h2", pair_key("h2", "peer"), 1, 1.0)
    assert engine.open_from_wire(sealed_by_h2(H1, 1.0), 1.0) == frame(H1, H2)  # opened before
    driver = EngineDriver(engine, SimpleNamespace(deliver=lambda d: None), lambda mac: None, lambda *notice: None)
    agent = stand_in(Agent, engine=engine, config=SimpleNamespace(key_max_age_s=7200.0), driver=driver)
    Agent.on_welcome(agent, welcome(H2 + H1 + H3))  # h2 and h3 revoked; our own MAC is ignored
    assert H2 not in engine.peers and {H2, H3} <= engine.revoked and H1 not in engine.revoked
    assert engine.open_from_wire(sealed_by_h2(H1, 6.0), 6.0) is None
    assert engine.drops[REVOKED_SENDER] == 1
    # A welcome from an older key server (no list) changes nothing.
    Agent.on_welcome(agent, {k: v for k, v in welcome(b"").items() if k != "revoked_macs"})
    assert engine.revoked == {H2, H3}


def test_the_gateway_drops_hosts_named_in_the_welcome():
    core = gateway(GA)
    core.install_multicast_key(MCAST_A, 1, 0.0)
    h2 = host(H2)

    def broadcast_from_h2(now):
        return core.from_encrypted(h2.seal_from_tap(arp(H2), now), now)
    assert broadcast_from_h2(1.0).to_plain == [arp(H2)]  # ARP crosses to the plain side before
    gw = stand_in(Gateway, core=core, _send=lambda out: None, tunnel=None, _to_server=lambda now: None,
                  client=SimpleNamespace(request_map_list=lambda: None, request_map=lambda m, s: None))
    Gateway.on_welcome(gw, welcome(H2 + GA))
    assert H2 in core.main.revoked and GA not in core.main.revoked
    assert broadcast_from_h2(6.0).to_plain == []
    assert core.main.drops[REVOKED_SENDER] == 1

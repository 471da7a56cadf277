"""Fuzzing what a peer key server sends (issue 15, low: "validate every field
from a peer"): peer messages, the ``revocations`` and ``multicast`` bodies,
NETKEY peering messages, and ``resolve_for_peer`` with arbitrary IDs and MACs.

Every input is either accepted as well-formed or refused with ValueError /
RemoteProtocolError (never another exception); whatever is accepted
re-encodes to itself; a peer never gets a key for an ID outside its namespace.
"""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, event, given, settings, strategies as st

from keyserverd.peering import netkey as nk
from keyserverd.peering import revocations as rp
from keyserverd.peering import messages as pm
from keyserverd.peering import multicast as mp
from keyserverd.peering.spec import PeerSpec
from l2crypt.core.errors import RemoteProtocolError
from message_strategies import decoder_codes, framed_then_mutated
from test_fuzz_keyserver import values

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NOW = 1_700_000_000.0


def _maps(fields, types):
    typed = st.fixed_dictionaries({"t": st.sampled_from(types + ["nope"])})
    return st.builds(lambda base, extra: {**extra, **base}, typed,
                     st.dictionaries(st.sampled_from(fields + ["t", "x"]), values, max_size=6))


def _packed(strategy):
    return strategy.map(lambda m: msgpack.packb(m, use_bin_type=True))


def test_peer_message_bodies():
    """Garbage, random maps, and valid peer messages of every type framed by
    the encoder then mutated: a body decodes to a message that re-encodes to
    itself or is refused as malformed; both were reached."""
    outcomes: set = set()

    @settings(FUZZ, max_examples=100)
    @given(st.one_of(st.binary(max_size=300), _packed(_maps(sorted(pm._FIELDS), sorted(pm.SCHEMA))),
                     framed_then_mutated(pm).map(lambda framed: framed[4:])))
    def decode(body):
        try:
            msg = pm.decode_body(body)
        except RemoteProtocolError as exc:
            assert exc.code in decoder_codes()
            outcomes.add(exc.code)
            event(f"refused {exc.code}")
            return
        assert pm.FrameReader().feed(pm.encode_message(msg)) == [msg]
        outcomes.add("message")
        event(f"message {msg['t']}")

    decode()
    assert outcomes == {"message", "malformed"}, outcomes  # oversized needs a length prefix: no body has one


@FUZZ
@given(st.one_of(st.binary(max_size=300), _packed(values),
                 _packed(st.dictionaries(st.sampled_from(["since", "after", "version", "hosts", "more", "op",
                                                          "above", "pw_id", "key"]), values, max_size=4))))
def test_extension_bodies(body):
    for decode in (rp.decode_request, lambda b: rp.decode_answer(b, ""), mp.decode_request, mp.decode_answer):
        try:
            decode(body)
        except ValueError:
            pass


@FUZZ
@given(_maps(["cert", "pw_id", "key", "created_at"], sorted(nk.FIELDS)))
def test_netkey_peering_messages(msg):
    try:
        nk.check_message(msg)
    except ValueError:
        return
    if "pw_id" in msg:
        assert 0 <= msg["pw_id"] <= nk.PW_ID_MAX


@FUZZ
@given(st.text(alphabet="abxyz-_.019*", min_size=1, max_size=10),
       st.one_of(st.sampled_from([bytes.fromhex("0200000000a1"), bytes.fromhex("0200000000a0")]),
                 st.binary(min_size=6, max_size=6)))
def test_resolve_for_peer_only_for_the_peers_ids(tmp_path_factory, from_id, mac):
    service, store = _service(tmp_path_factory)
    peer = PeerSpec.parse("x*=sha256:" + "1" * 64 + "@192.0.2.9:7790")
    try:
        answer = service.resolve_for_peer(mac, from_id, peer, NOW)
    except Exception as exc:  # a bad from_id never reaches here from the wire (peer_messages refuses it)
        raise AssertionError(f"{from_id!r}: {exc!r}") from exc
    if "key" in answer:
        assert peer.owns(from_id) and store.get_host(from_id) is None
    if not peer.owns(from_id):
        assert answer["t"] == "error" and answer["code"] == "forbidden"


_SERVICES = {}


def _service(factory):
    if "s" not in _SERVICES:
        from keyserverd.ca import CertificateAuthority
        from keyserverd.service import KeyService
        from keyserverd.store.sqlite import SqliteStore
        d = factory.mktemp("fuzzpeer")
        store = SqliteStore.open(d / "keyserver.db", NOW)
        for host_id, mac in (("a1", "0200000000a1"), ("x0", "0200000000a0")):
            store.add_host(host_id, bytes.fromhex(mac), "host", b"t" * 32, 4e9, NOW)
        _SERVICES["s"] = (KeyService(store, "aes-256-gcm", "ks", CertificateAuthority.open(d, ())), store)
    return _SERVICES["s"]

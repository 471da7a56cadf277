"""Host authentication by challenge (issue 19), over fakes: a software key stands
in for the token, a dict for the host table, and ``KeyService.handle`` runs
without sockets.  See ``l2crypt.core.challenge_auth`` for the protocol."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyserverd.ca import CertificateAuthority
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.core.challenge_auth import CHALLENGE_TTL_S, ChallengeIssuer, answer_challenge, server_fingerprint
from l2crypt.core.errors import RefusedError
from l2crypt.core.x509_der import build_csr_pem
from test_keyserver_claims import call  # checks every answer is a valid wire message

NOW = float(int(time.time()))  # certificates are issued for the real clock
MAC_A = bytes.fromhex("020000000001")
TOKEN = "aaaaaa.0123456789abcdef"


class SoftSigner:
    """A software key in place of the token (``challenge_auth.Signer``); counts its signatures."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.signed = 0

    def sign(self, data: bytes) -> bytes:
        self.signed += 1
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def enroll(ca: CertificateAuthority, host_id: str, signer: SoftSigner) -> bytes:
    """A certificate for ``signer``'s key, requested with a CSR the signer signed."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)])
    return ca.sign_csr(build_csr_pem(name, signer.key.public_key(), signer.sign), host_id)


def server_der(ca: CertificateAuthority) -> bytes:
    return x509.load_pem_x509_certificate(ca.server_cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def world(tmp_path):
    ca = CertificateAuthority.open(tmp_path / "ks", ())
    hosts = {"h1": SimpleNamespace(revoked=False), "h2": SimpleNamespace(revoked=False)}
    signers = {h: SoftSigner() for h in hosts}
    certs = {h: enroll(ca, h, signers[h]) for h in hosts}
    issuer = ChallengeIssuer(ca.ca_cert, ca.server_fingerprint(), SimpleNamespace(get_host=hosts.get))
    return SimpleNamespace(ca=ca, hosts=hosts, signers=signers, certs=certs, issuer=issuer, der=server_der(ca))


def answer(world, pending, host="h1", signer=None, cert=None, der=None):
    return answer_challenge(pending.challenge, der or world.der, host, cert or world.certs[host],
                            signer or world.signers[host])


def refused(world, pending, msg, now=NOW + 1) -> str:
    with pytest.raises(RefusedError) as info:
        world.issuer.verify(pending, msg, now)
    return info.value.code


def test_good_signature_names_the_host(world):
    pending = world.issuer.issue(NOW)
    before = world.signers["h1"].signed
    assert world.issuer.verify(pending, answer(world, pending), NOW + 1) == "h1"
    assert world.signers["h1"].signed == before + 1  # the device signed, once


def test_challenges_are_fresh(world):
    assert world.issuer.issue(NOW).challenge != world.issuer.issue(NOW).challenge


def test_replayed_challenge_is_refused(world):
    first = world.issuer.issue(NOW)
    recorded = answer(world, first)
    assert world.issuer.verify(first, recorded, NOW + 1) == "h1"
    # The same answer on another connection: that one has its own challenge.
    assert refused(world, world.issuer.issue(NOW + 2), recorded, NOW + 3) == "challenge_replayed"
    # Or on the same one again: the challenge was used up (the caller dropped it).
    assert refused(world, None, recorded) == "challenge_replayed"


def test_stale_answer_is_refused(world):
    pending = world.issuer.issue(NOW)
    assert refused(world, pending, answer(world, pending), NOW + CHALLENGE_TTL_S + 1) == "challenge_stale"


def test_signature_over_another_servers_fingerprint_is_refused(world, tmp_path):
    other = CertificateAuthority.open(tmp_path / "other", ())  # a server the host talked to, relaying
    pending = world.issuer.issue(NOW)
    relayed = answer(world, pending, der=server_der(other))
    assert relayed["server_fp"] == server_fingerprint(server_der(other))
    assert refused(world, pending, relayed) == "wrong_server"
    # Claiming our fingerprint does not help: the signature covers the other one.
    assert refused(world, pending, {**relayed, "server_fp": world.issuer.own_fingerprint}) == "bad_signature"


def test_signature_by_another_hosts_key_is_refused(world):
    pending = world.issuer.issue(NOW)
    forged = answer(world, pending, host="h1", signer=world.signers["h2"])  # h2's token, h1's certificate
    assert refused(world, pending, forged) == "bad_signature"
    # h2's certificate under h1's name is no better.
    assert refused(world, pending, answer(world, pending, host="h1", cert=world.certs["h2"])) == "bad_certificate"


def test_revoked_host_is_refused(world):
    world.hosts["h1"].revoked = True
    pending = world.issuer.issue(NOW)
    assert refused(world, pending, answer(world, pending)) == "revoked"
    assert world.issuer.verify(pending, answer(world, pending, host="h2"), NOW + 1) == "h2"


def test_certificate_of_another_ca_is_refused(world, tmp_path):
    rogue = CertificateAuthority.open(tmp_path / "rogue", ())
    signer = SoftSigner()
    pending = world.issuer.issue(NOW)
    msg = answer(world, pending, signer=signer, cert=enroll(rogue, "h1", signer))
    assert refused(world, pending, msg) == "bad_certificate"


def test_unknown_host_is_refused(world):
    del world.hosts["h2"]
    pending = world.issuer.issue(NOW)
    assert refused(world, pending, answer(world, pending, host="h2")) == "unknown_host"


# --- through KeyService.handle, as the server runs it ---------------------------------

@pytest.fixture
def service(tmp_path):
    ca = CertificateAuthority.open(tmp_path / "ks", ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in ("h1", "h2"):
        store.add_host(host_id, None, "host", hash_token(TOKEN), NOW + 60, NOW)
    svc = KeyService(store, "aes-256-gcm", "ks-test", ca)
    yield svc
    store.close()


def authenticate(svc, session, host_id, signer, cert):
    challenge = call(svc, session, {"t": "auth_begin", "rid": 1}, NOW)[0][1]
    assert challenge["t"] == "challenge"
    msg = answer_challenge(challenge["challenge"], server_der(svc.ca), host_id, cert, signer)
    return call(svc, session, {**msg, "rid": 2}, NOW + 1)


def test_service_gives_the_session_its_identity_then_answers(service):
    signer = SoftSigner()
    cert = enroll(service.ca, "h1", signer)
    session = Session(identity=None, peer="192.0.2.1:4000")
    refused_hello = call(service, session, {"t": "hello", "rid": 1, "mac": MAC_A}, NOW)
    assert refused_hello[0][1]["code"] == "unauthenticated"  # nothing else before the challenge
    actions = authenticate(service, session, "h1", signer, cert)
    assert actions == [("reply", {"t": "authenticated", "rid": 2, "id": "h1"})]
    assert (session.identity, session.auth, session.challenge) == ("h1", "token", None)
    assert call(service, session, {"t": "hello", "rid": 3, "mac": MAC_A}, NOW)[0][1]["t"] == "welcome"
    again = call(service, session, {"t": "auth_begin", "rid": 4}, NOW)
    assert again[0][1]["code"] == "bad_request"


def test_service_refusal_closes_and_is_logged(service, caplog):
    signer = SoftSigner()
    cert = enroll(service.ca, "h1", signer)
    session = Session(identity=None, peer="192.0.2.9:4000")
    with caplog.at_level(logging.WARNING, logger="keyserverd"):
        actions = authenticate(service, session, "h1", SoftSigner(), cert)  # not h1's key
    assert actions[0][1]["code"] == "bad_signature" and actions[1][0] == "close"
    assert session.identity is None and session.challenge is None
    line = [r for r in caplog.records if r.getMessage() == "challenge_refused"]
    assert line and line[0].fields["code"] == "bad_signature" and line[0].fields["peer"] == "192.0.2.9:4000"
    assert service.refusals["bad_signature"] == 1


def test_service_refuses_a_revoked_host(service):
    signer = SoftSigner()
    cert = enroll(service.ca, "h2", signer)
    service.store.revoke_host("h2", NOW)
    session = Session(identity=None)
    actions = authenticate(service, session, "h2", signer, cert)
    assert actions[0][1]["code"] == "revoked" and actions[1][0] == "close"
    assert session.identity is None

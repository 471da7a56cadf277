"""Key-server handlers of host authentication by challenge, mixed into ``KeyService``.

A host whose key is on a token shows no client certificate in TLS (Python's
``ssl`` cannot use the token); it proves who it is inside the channel instead
(``l2crypt.core.challenge_auth`` has the reasoning and the checks):

1. ``auth_begin``: a fresh challenge goes into the session and back to the host.
2. ``auth``: the challenge leaves the session (answered once, right or wrong)
   and ``ChallengeIssuer.verify`` checks the answer.  Accepted: the session
   takes the host ID (``Session.auth`` = ``token``), the host is told
   ``authenticated``, and the server layer counts the connection as the
   host's from then on.  Refused: the host gets the error code, the
   connection is closed, and ``challenge_refused`` is logged at WARNING with
   the peer and the reason, once per (address, code) every ``REFUSAL_LOG_S``,
   as a refused TLS handshake is.
3. A connection that is already a host's (a certificate, or an earlier
   ``auth``) gets ``bad_request`` for either.
"""

from __future__ import annotations

import logging

from l2crypt.core.challenge_auth import ChallengeIssuer
from l2crypt.core.errors import RefusedError
from l2crypt.ops.logs import fields

log = logging.getLogger("keyserverd")


class ChallengeHandlers:
    """Needs ``self.store``, ``self.ca``, ``self.refusals`` and ``self._limited`` (KeyService)."""

    #: Built at the first challenge from the CA and the server certificate (``issuer``).
    challenge_issuer: ChallengeIssuer | None = None

    def issuer(self) -> ChallengeIssuer:
        if self.challenge_issuer is None:
            self.challenge_issuer = ChallengeIssuer(self.ca.ca_cert, self.ca.server_fingerprint(), self.store)
        return self.challenge_issuer

    def _on_auth_begin(self, session, msg: dict, now: float) -> list:
        if session.identity is not None:
            raise RefusedError("this connection is already authenticated", "bad_request")
        session.challenge = self.issuer().issue(now)
        return [("reply", {"t": "challenge", "rid": msg["rid"], "challenge": session.challenge.challenge})]

    def _on_auth(self, session, msg: dict, now: float) -> list:
        if session.identity is not None:
            raise RefusedError("this connection is already authenticated", "bad_request")
        pending, session.challenge = session.challenge, None
        try:
            host_id = self.issuer().verify(pending, msg, now)
        except RefusedError as exc:
            self.refusals[exc.code] += 1
            address = session.peer.rsplit(":", 1)[0]
            self._limited(logging.WARNING, "challenge_refused", ("challenge", address, exc.code), now,
                          peer=session.peer, host=msg["id"], code=exc.code, reason=str(exc))
            return [("reply", {"t": "error", "rid": msg["rid"], "code": exc.code, "msg": str(exc)[:1000]}),
                    ("close", {})]
        session.identity = host_id
        session.auth = "token"
        log.info("host_authenticated", extra=fields(host=host_id, peer=session.peer, auth="token"))
        return [("reply", {"t": "authenticated", "rid": msg["rid"], "id": host_id})]

"""Typed exceptions of the control path (the packet path never raises).

Kept apart as h11 does: ``LocalError`` is our own misuse or bad local input
(config, arguments); ``RemoteProtocolError`` is a peer's bad message.  Each has
a short ``code`` and a human sentence; a CLI prints ``str(exc)`` as one line.
"""


class L2cryptError(Exception):
    """Base class.  ``code`` is a stable machine-readable name."""

    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalError(L2cryptError):
    """Our own mistake or bad local input: config, arguments, files."""

    code = "local"


class ConfigError(LocalError):
    """A config file or CLI value is wrong; the message names the key."""

    code = "config"


class RemoteProtocolError(L2cryptError):
    """A peer sent something malformed, oversized or out of order."""

    code = "protocol"


class RefusedError(L2cryptError):
    """The key server understood the request and said no."""

    code = "refused"

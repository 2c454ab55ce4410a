"""The two ways NBD input can be wrong, which the transport treats differently."""

from __future__ import annotations

__all__ = ["NbdProtocolError", "OptionDataError"]


class NbdProtocolError(Exception):
    """The peer broke the framing (bad magic, unknown client flags, a length
    we refuse to buffer): the stream cannot be trusted, close the connection."""


class OptionDataError(Exception):
    """An option's data is malformed, but its length framed it correctly:
    answer NBD_REP_ERR_INVALID and keep negotiating."""

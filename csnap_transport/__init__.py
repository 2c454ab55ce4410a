"""csnap_transport: csnap's protocol over trio streams, shared by csnapd's
server, the agent, csnapd's link to its agent and the client library: one
message stream (read bytes, feed the codec, take messages; coalesced writes)
and the socket stream under it (TLS or plain) that sends and receives
without yielding when the kernel allows.
Listeners are served by trio.serve_listeners, which also backs off when
accept fails for want of descriptors.
"""

from __future__ import annotations

from csnap_transport.direct import DirectStream
from csnap_transport.stream import MessageStream

__all__ = ["DirectStream", "MessageStream"]

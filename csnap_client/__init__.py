"""csnap_client: the trio client library for csnapd.

DataClient (open_client) is the data path: identify to the origin or a
snapshot, ask before touching chunks, survive server restarts. AdminClient
(open_admin) creates, deletes and inspects snapshots. Both speak
csnap_protocol over any trio stream a Connector opens; agent_connector finds
the server through a node's csnap-agent.
"""

from __future__ import annotations

from csnap_client.admin import AdminClient, open_admin
from csnap_client.agent import (
    DEFAULT_AGENT,
    agent_admin_connector,
    agent_connector,
    agent_store_connector,
    default_agent,
    find_server,
    open_agent_stream,
)
from csnap_client.client import (
    ClientClosedError,
    DataClient,
    LeaseExpiredError,
    ReadPlan,
    SnapshotDeletedError,
    open_client,
)
from csnap_client.secure import open_tls_stream, tcp_connector
from csnap_client.session import (
    AuthenticationError,
    ConnectionLostError,
    Connector,
    ServerError,
    Session,
    open_session,
)

__all__ = [
    "DEFAULT_AGENT",
    "agent_admin_connector",
    "agent_connector",
    "agent_store_connector",
    "default_agent",
    "find_server",
    "open_agent_stream",
    "AdminClient",
    "open_admin",
    "DataClient",
    "ReadPlan",
    "LeaseExpiredError",
    "SnapshotDeletedError",
    "ClientClosedError",
    "open_client",
    "ConnectionLostError",
    "Connector",
    "ServerError",
    "Session",
    "open_session",
    "AuthenticationError",
    "open_tls_stream",
    "tcp_connector",
]

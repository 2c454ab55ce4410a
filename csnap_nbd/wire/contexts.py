"""The metadata contexts the gateway offers, their ids, and how a list or set
query selects among them.

Queries follow the spec: "namespace:" (an empty leaf) names every context
of that namespace when listing and none when setting; a full name names
itself; anything else (other namespaces, unknown leaves) selects nothing
and is not an error. Ids are fixed per context, so a reply never depends
on the order of queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MetaContext",
    "BASE_ALLOCATION",
    "CSNAP_EXCEPTIONS",
    "CONTEXTS",
    "select_contexts",
    "valid_query",
]


@dataclass(frozen=True, slots=True)
class MetaContext:
    id: int
    name: str

    @property
    def namespace(self) -> str:
        return self.name.partition(":")[0]


#: The spec's allocation context: bit 0 hole, bit 1 zero.
BASE_ALLOCATION = MetaContext(1, "base:allocation")
#: csnap's own: bit 0 set where the chunk has a copy in the snapshot store.
CSNAP_EXCEPTIONS = MetaContext(2, "csnap:exceptions")

CONTEXTS: tuple[MetaContext, ...] = (BASE_ALLOCATION, CSNAP_EXCEPTIONS)


def valid_query(query: str) -> bool:
    """A query must start with a namespace: "name:" with a nonempty name."""
    namespace, colon, _ = query.partition(":")
    return bool(colon and namespace)


def select_contexts(queries: Sequence[str], *, listing: bool) -> list[MetaContext]:
    """The contexts these queries name, in id order.

    `listing` is NBD_OPT_LIST_META_CONTEXT, where no query at all means
    every context and "namespace:" means every context of the namespace.
    """
    if listing and not queries:
        return list(CONTEXTS)
    chosen: set[MetaContext] = set()
    for query in queries:
        namespace, _, leaf = query.partition(":")
        for context in CONTEXTS:
            if query == context.name or (listing and not leaf and namespace == context.namespace):
                chosen.add(context)
    return sorted(chosen, key=lambda c: c.id)

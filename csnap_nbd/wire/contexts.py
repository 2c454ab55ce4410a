"""The metadata contexts the gateway offers, their ids, and how a list or set
query selects among them.

Queries follow the spec: "namespace:" (an empty leaf) names every context
of that namespace when listing and none when setting; a full name names
itself; anything else (other namespaces, unknown leaves) selects nothing
and is not an error. Ids are fixed per context, so a reply never depends
on the order of queries.

The diff contexts are one per base snapshot: "csnap:diff:TAG", for every
live snapshot's tag. The query "csnap:diff:" lists them all (a prefix
query, as the spec lets a namespace define). Their ids are DIFF_FIRST_ID
plus the base's rank among the bases the same query selects, so they too
depend only on the queries and the live snapshots, never on query order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MetaContext",
    "BASE_ALLOCATION",
    "CSNAP_EXCEPTIONS",
    "CONTEXTS",
    "DIFF_PREFIX",
    "DIFF_FIRST_ID",
    "diff_base",
    "wants_bases",
    "select_contexts",
    "valid_query",
]


@dataclass(frozen=True, slots=True)
class MetaContext:
    id: int
    name: str
    #: For a csnap:diff context: the tag of its base snapshot.
    base: int | None = None

    @property
    def namespace(self) -> str:
        return self.name.partition(":")[0]


#: The spec's allocation context: bit 0 hole, bit 1 zero.
BASE_ALLOCATION = MetaContext(1, "base:allocation")
#: csnap's own: bit 0 set where the chunk has a copy in the snapshot store.
CSNAP_EXCEPTIONS = MetaContext(2, "csnap:exceptions")

CONTEXTS: tuple[MetaContext, ...] = (BASE_ALLOCATION, CSNAP_EXCEPTIONS)

#: Names of the diff contexts: this prefix, then a base snapshot's tag in decimal.
DIFF_PREFIX = "csnap:diff:"
#: Id of the first diff context a query selects; the fixed contexts come below.
DIFF_FIRST_ID = 16
_MAX_TAG = 0xFFFF_FFFF


def diff_base(name: str) -> int | None:
    """The base tag a diff context's name carries, or None if `name` is not one."""
    if not name.startswith(DIFF_PREFIX):
        return None
    digits = name[len(DIFF_PREFIX) :]
    # Canonical decimal only: one name per context ("03" is not "3").
    if not digits.isascii() or not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        return None
    tag = int(digits)
    return tag if tag <= _MAX_TAG else None


def wants_bases(queries: Sequence[str], *, listing: bool) -> bool:
    """Whether answering these queries needs the list of live snapshots."""
    if listing and not queries:
        return True
    return any(q.startswith(DIFF_PREFIX) or (listing and q == "csnap:") for q in queries)


def valid_query(query: str) -> bool:
    """A query must start with a namespace: "name:" with a nonempty name."""
    namespace, colon, _ = query.partition(":")
    return bool(colon and namespace)


def select_contexts(
    queries: Sequence[str], *, listing: bool, bases: Sequence[int] = ()
) -> list[MetaContext]:
    """The contexts these queries name, in id order.

    `listing` is NBD_OPT_LIST_META_CONTEXT, where no query at all means
    every context, "namespace:" means every context of the namespace and
    "csnap:diff:" every diff context. `bases` are the tags a diff context
    may name (the live snapshots).
    """
    live = set(bases)
    chosen: set[MetaContext] = set()
    tags: set[int] = set()
    for query in queries if queries or not listing else [""]:
        namespace, _, leaf = query.partition(":")
        # Listing: no query at all, or "namespace:", names a whole namespace.
        every = listing and not leaf
        for context in CONTEXTS:
            if query == context.name or (every and namespace in ("", context.namespace)):
                chosen.add(context)
        if (every and namespace in ("", "csnap")) or (listing and query == DIFF_PREFIX):
            tags |= live
        else:
            tag = diff_base(query)
            if tag is not None and tag in live:
                tags.add(tag)
    diffs = [
        MetaContext(DIFF_FIRST_ID + rank, f"{DIFF_PREFIX}{tag}", tag)
        for rank, tag in enumerate(sorted(tags))
    ]
    return sorted(chosen, key=lambda c: c.id) + diffs

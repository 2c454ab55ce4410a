"""The check that the client registry block is the version the superblock names.

The superblock records the sequence of the transaction that wrote the
registry block last (docs/format.md, "Client registry state"). A registry
block that decodes but carries another sequence is a stale copy (a write
the disk acknowledged and lost) or a block from elsewhere: which clients
were connected is then unknown. csnap-check reports it under the rule
`registry-sequence`; --repair replaces the registry as for any damaged one.
A superblock written before the field existed holds 0 there, and then
nothing is compared.
"""

from __future__ import annotations

from csnap_format import Registry, Superblock

__all__ = ["RULE", "registry_version_problem"]

#: The rule's name in check reports (docs/operations.md, "Checking a store").
RULE = "registry-sequence"


def registry_version_problem(sb: Superblock, registry: Registry) -> str | None:
    """Why `registry` is not the version `sb` names; None when it is, or unknown."""
    recorded = sb.registry_sequence
    if not recorded or registry.sequence == recorded:
        return None
    if registry.sequence < recorded:
        return (
            f"registry block is from transaction {registry.sequence}, but the superblock"
            f" names its version from transaction {recorded}: a write was lost"
        )
    return (
        f"registry block is from transaction {registry.sequence}, newer than the version"
        f" from transaction {recorded} the superblock names"
    )

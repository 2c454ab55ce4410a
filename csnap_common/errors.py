"""Exceptions out of nurseries: a single failure leaves as itself.

Trio wraps whatever escapes a nursery in an ExceptionGroup. Our libraries
and daemons open nurseries internally; their callers should catch the
OSError or ServerError that happened, not a group holding one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["single_errors"]


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise a group holding exactly one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc

"""The table from engine error class to wire code covers every engine error.

Every subclass of EngineError, public or private, found in any module of
csnapd.engine, must answer with a defined ErrorCode; errors whose symbolic
name is a wire symbol answer with that very code; and errors a real engine
raises reach the wire with the code docs/protocol.md gives them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import pytest

import csnapd.engine
from csnap_protocol import ErrorCode
from csnapd.engine import (
    Engine,
    EngineError,
    InvalidRequestError,
    OverlappingRangesError,
    RevertInProgressError,
    SnapshotBusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
)
from csnapd.wire_errors import ENGINE_ERROR_CODES, error_code, wire_code_of
from tests.engine.helpers import new_store


def _every_engine_error() -> list[type[EngineError]]:
    for module in pkgutil.iter_modules(csnapd.engine.__path__, "csnapd.engine."):
        importlib.import_module(module.name)
    found: list[type[EngineError]] = []
    todo: list[type[EngineError]] = [EngineError]
    while todo:
        error_class = todo.pop()
        found.append(error_class)
        todo.extend(error_class.__subclasses__())
    return found


EVERY_ENGINE_ERROR = _every_engine_error()


def test_the_walk_finds_private_subclasses() -> None:
    names = {error_class.__name__ for error_class in EVERY_ENGINE_ERROR}
    assert {"_SpaceError", "_TransactionOverflowError", "StoreLockedError"} <= names


@pytest.mark.parametrize("error_class", EVERY_ENGINE_ERROR, ids=lambda c: c.__name__)
def test_every_engine_error_has_a_defined_wire_code(error_class: type[EngineError]) -> None:
    code = wire_code_of(error_class)
    assert code in set(ErrorCode)
    exc = error_class.__new__(error_class)
    assert error_code(exc) is code


@pytest.mark.parametrize("error_class", EVERY_ENGINE_ERROR, ids=lambda c: c.__name__)
def test_an_engine_symbol_that_is_a_wire_symbol_keeps_its_code(
    error_class: type[EngineError],
) -> None:
    wire_symbols = {code.symbol: code for code in ErrorCode}
    if error_class.code in wire_symbols:
        assert wire_code_of(error_class) is wire_symbols[error_class.code]
    else:
        assert error_class.code in {"engine_error", "engine_failed", "cannot_open", "store_locked"}


def test_every_public_engine_error_is_in_the_table() -> None:
    public = [
        getattr(csnapd.engine, name)
        for name in csnapd.engine.__all__
        if isinstance(getattr(csnapd.engine, name), type)
        and issubclass(getattr(csnapd.engine, name), EngineError)
    ]
    assert len(public) == 22
    assert set(public) == set(ENGINE_ERROR_CODES)


def test_the_codes_docs_protocol_names_for_server_side_failures() -> None:
    codes = {error_class.__name__: wire_code_of(error_class) for error_class in EVERY_ENGINE_ERROR}
    assert codes["EngineError"] is ErrorCode.INTERNAL_ERROR
    assert codes["EngineFailedError"] is ErrorCode.SERVER_FAILED
    assert codes["StoreOpenError"] is ErrorCode.IO_ERROR
    assert codes["StoreLockedError"] is ErrorCode.IO_ERROR
    assert codes["_TransactionOverflowError"] is ErrorCode.REQUEST_TOO_LARGE
    assert codes["OverlappingRangesError"] is ErrorCode.INVALID_REQUEST


def test_errors_a_real_engine_raises_reach_the_wire_with_their_codes() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.change_use_count(1, 1)
    engine.commit()
    cases: list[tuple[Callable[[], object], type[EngineError], ErrorCode]] = [
        (lambda: engine.create_snapshot(1), SnapshotExistsError, ErrorCode.SNAPSHOT_EXISTS),
        (lambda: engine.delete_snapshot(2), SnapshotNotFoundError, ErrorCode.NO_SUCH_SNAPSHOT),
        (lambda: engine.delete_snapshot(1), SnapshotBusyError, ErrorCode.SNAPSHOT_BUSY),
        (lambda: engine.origin_write([(0, 0)]), InvalidRequestError, ErrorCode.INVALID_REQUEST),
        (
            lambda: engine.origin_write([(0, 2), (1, 1)]),
            OverlappingRangesError,
            ErrorCode.INVALID_REQUEST,
        ),
    ]
    for request, error_class, code in cases:
        with pytest.raises(error_class) as caught:
            request()
        assert error_code(caught.value) is code
    engine.start_revert(1)  # left in progress: origin writes would wait for it
    engine.commit()
    with pytest.raises(RevertInProgressError) as caught:
        engine.create_snapshot(2)
    assert error_code(caught.value) is ErrorCode.REVERT_IN_PROGRESS
    engine.close()

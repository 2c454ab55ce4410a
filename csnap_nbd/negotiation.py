"""The handshake of one connection, over trio: greeting, client flags, then
options until the client picks an export (GO or EXPORT_NAME) or leaves.

Every option gets a reply, an unknown one NBD_REP_ERR_UNSUP, a malformed
one NBD_REP_ERR_INVALID; only broken framing (bad magic, unknown client
flags, an option too long to skip) ends the connection, as the spec asks.

NBD_OPT_STARTTLS (docs/nbd.md, "TLS"): the ACK, then the TLS handshake,
then haggling starts again on the encrypted stream with nothing kept from
before. With --tls=require every other option but ABORT is refused with
NBD_REP_ERR_TLS_REQD until then.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from csnap_nbd.connection import Connection
from csnap_nbd.datapath import DataPath
from csnap_nbd.exports import (
    ExportInfo,
    Exports,
    ServerUnreachableError,
    UnknownExportError,
)
from csnap_nbd.settings import Settings
from csnap_nbd.tls import TlsMode, TlsPolicy, describe, start_tls
from csnap_nbd.wire import NbdProtocolError, OptionDataError
from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire.constants import ClientFlag, HandshakeFlag, Info, Option, Reply
from csnap_nbd.wire.constants import TransmissionFlag as TF
from csnap_nbd.wire.contexts import MetaContext, select_contexts, valid_query, wants_bases

__all__ = ["Negotiated", "negotiate", "transmission_flags", "MIN_BLOCK"]

log = logging.getLogger("csnap.nbd.handshake")

OFFERED = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
#: Requests of any alignment work (partial chunks are handled), so the
#: advertised minimum is one byte.
MIN_BLOCK = 1


@dataclass
class Negotiated:
    """What the handshake settled: the export, its data path, reply style, contexts."""

    export: ExportInfo
    path: DataPath
    flags: TF
    structured: bool
    contexts: list[MetaContext]
    #: The connection transmission runs on: the TLS one after STARTTLS.
    conn: Connection


def transmission_flags(settings: Settings, *, structured: bool) -> TF:
    """What every export advertises: flush and FUA, zeroes, trim (a hint we
    ignore), cache (a hint we ignore), and multi-conn, since the gateway
    keeps no cache of its own and a flush syncs the files every connection
    writes to."""
    flags = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_CACHE | TF.CAN_MULTI_CONN
    if settings.read_only:
        flags |= TF.READ_ONLY
    else:
        flags |= TF.SEND_WRITE_ZEROES | TF.SEND_TRIM
    if structured:
        # Reads are always answered with one data chunk, so "don't fragment"
        # costs nothing to honour.
        flags |= TF.SEND_DF
    return flags


@dataclass
class _State:
    conn: Connection
    exports: Exports
    settings: Settings
    stack: AsyncExitStack
    stopping: Callable[[], bool]
    tls: TlsPolicy
    upgraded: Callable[[Connection], None]
    no_zeroes: bool = False
    #: TLS is up: everything from here on is encrypted.
    encrypted: bool = False
    structured: bool = False
    contexts: list[MetaContext] = field(default_factory=list)
    #: The export the contexts were selected for: GO on another drops them.
    contexts_for: str | None = None
    result: Negotiated | None = None
    done: bool = False

    async def reply(self, opt: int, reply: int, data: bytes = b"") -> None:
        await self.conn.send(hs.option_reply(opt, reply, data))

    async def error(self, opt: int, reply: Reply, message: str) -> None:
        log.debug("option %d refused: %s", opt, message)
        await self.conn.send(hs.error_reply(opt, reply, message))


#: The policy of a gateway without TLS.
_NO_TLS = TlsPolicy()


async def negotiate(
    conn: Connection,
    exports: Exports,
    settings: Settings,
    stack: AsyncExitStack,
    stopping: Callable[[], bool] = lambda: False,
    tls: TlsPolicy = _NO_TLS,
    upgraded: Callable[[Connection], None] = lambda conn: None,
) -> Negotiated | None:
    """Run the handshake; the export (if any) stays open until `stack` closes.

    After NBD_OPT_STARTTLS the handshake goes on over a new Connection on
    the TLS stream; `upgraded` is told of it, and it is the one transmission
    must use (Negotiated.conn).

    Returns None when the client aborted or asked for an export that cannot
    be served with EXPORT_NAME (which has no way to say no but closing).

    Raises:
        NbdProtocolError: framing the connection cannot recover from.
        PeerClosedError: the client went away.
        TlsHandshakeError: the TLS handshake after STARTTLS failed.
    """
    await conn.send(hs.greeting(OFFERED))
    flags = hs.parse_client_flags(await conn.receive_exactly(hs.CLIENT_FLAGS.size), OFFERED)
    state = _State(conn, exports, settings, stack, stopping, tls, upgraded)
    state.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
    while not state.done:
        header = hs.parse_option_header(await state.conn.receive_exactly(hs.OPTION_HEADER.size))
        if not await _option(state, header):
            return None
    return state.result


async def _option(state: _State, header: hs.OptionHeader) -> bool:
    """Read one option's data and answer it; False when the only answer is
    to close (NBD_OPT_EXPORT_NAME has no error reply)."""
    opt, settings = header.option, state.settings
    handler = _HANDLERS.get(opt)
    # FORCEDTLS in the specification's words: before TLS is up only
    # STARTTLS and ABORT are answered, whatever the option.
    refused = _tls_required(state, opt)
    if header.length > settings.max_option:
        if header.length > settings.max_drain:
            raise NbdProtocolError(f"option {opt} with {header.length} bytes")
        await state.conn.discard(header.length)
        if refused:
            await state.error(opt, Reply.ERR_TLS_REQD, _TLS_REQUIRED)
        elif handler is None:
            await state.error(opt, Reply.ERR_UNSUP, "unknown option")
        else:
            await state.error(opt, Reply.ERR_TOO_BIG, "option data too long")
        return True
    data = await state.conn.receive_exactly(header.length)
    if state.stopping() and opt != Option.ABORT:
        if opt == Option.EXPORT_NAME:
            return False
        await state.error(opt, Reply.ERR_SHUTDOWN, "the gateway is shutting down")
        return True
    if refused:
        if opt == Option.EXPORT_NAME:
            log.info("NBD_OPT_EXPORT_NAME before TLS, which is required; closing")
            return False
        await state.error(opt, Reply.ERR_TLS_REQD, _TLS_REQUIRED)
        return True
    if handler is None:
        await state.error(opt, Reply.ERR_UNSUP, f"option {opt} unknown")
        return True
    try:
        await handler(state, opt, data)
    except OptionDataError as exc:
        if opt == Option.EXPORT_NAME:
            return False
        await state.error(opt, Reply.ERR_INVALID, str(exc))
    return True


_TLS_REQUIRED = "TLS is required: send NBD_OPT_STARTTLS first"


def _tls_required(state: _State, opt: int) -> bool:
    return (
        state.tls.mode is TlsMode.REQUIRE
        and not state.encrypted
        and opt not in (Option.STARTTLS, Option.ABORT)
    )


async def _starttls(state: _State, opt: int, data: bytes) -> None:
    """NBD_OPT_STARTTLS: ACK, handshake, then negotiation starts over encrypted."""
    if state.tls.context is None:
        await state.error(opt, Reply.ERR_UNSUP, "TLS is not enabled on this gateway (--tls=off)")
        return
    if data:
        raise OptionDataError("NBD_OPT_STARTTLS carries no data")
    if state.encrypted:
        raise OptionDataError("TLS is already running on this connection")
    if state.conn.buffered:
        # The client must wait for the ACK before its TLS handshake; bytes
        # already sent could only be lost to the TLS layer.
        raise NbdProtocolError("data sent after NBD_OPT_STARTTLS before its reply")
    await state.reply(opt, Reply.ACK)
    stream = await start_tls(state.conn.stream, state.tls.context)
    state.conn = Connection(stream)
    state.encrypted = True
    state.upgraded(state.conn)
    # The specification: nothing negotiated before STARTTLS is kept.
    state.structured = False
    state.contexts, state.contexts_for = [], None
    log.debug("TLS up: %s", describe(stream))


async def _abort(state: _State, opt: int, data: bytes) -> None:
    await state.reply(opt, Reply.ACK)
    state.done = True


async def _list(state: _State, opt: int, data: bytes) -> None:
    if data:
        raise OptionDataError("NBD_OPT_LIST carries no data")
    try:
        exports = await state.exports.list_exports()
    except ServerUnreachableError as exc:
        await state.error(opt, Reply.ERR_POLICY, str(exc))
        return
    for export in exports:
        await state.reply(opt, Reply.SERVER, hs.server_entry(export.name, export.description))
    await state.reply(opt, Reply.ACK)


async def _structured(state: _State, opt: int, data: bytes) -> None:
    if data:
        raise OptionDataError("NBD_OPT_STRUCTURED_REPLY carries no data")
    state.structured = True
    await state.reply(opt, Reply.ACK)


async def _lookup(state: _State, opt: int, name: str) -> ExportInfo | None:
    try:
        return await state.exports.lookup(name)
    except UnknownExportError as exc:
        await state.error(opt, Reply.ERR_UNKNOWN, str(exc))
    except ServerUnreachableError as exc:
        await state.error(opt, Reply.ERR_UNKNOWN, f"cannot check export {name!r}: {exc}")
    return None


async def _info(state: _State, opt: int, data: bytes) -> None:
    """NBD_OPT_INFO and NBD_OPT_GO; GO also opens the export and ends the handshake."""
    request = hs.parse_info_request(data)
    export = await _lookup(state, opt, request.name)
    if export is None:
        return
    path: DataPath | None = None
    if opt == Option.GO:
        try:
            path = await state.stack.enter_async_context(state.exports.use(export.tag))
        except UnknownExportError as exc:
            await state.error(opt, Reply.ERR_UNKNOWN, str(exc))
            return
    flags = transmission_flags(state.settings, structured=state.structured)
    if path is not None:
        size = path.size
    else:
        try:
            size = await state.exports.export_size(export.tag)
        except ServerUnreachableError as exc:
            await state.error(opt, Reply.ERR_UNKNOWN, str(exc))
            return
    await state.reply(opt, Reply.INFO, hs.info_export(size, flags))
    if Info.NAME in request.infos:
        await state.reply(opt, Reply.INFO, hs.info_name(export.name))
    if Info.DESCRIPTION in request.infos:
        await state.reply(opt, Reply.INFO, hs.info_description(export.description))
    # Sent even when not asked for: clients that did not ask treat it as a
    # hint, and nothing here depends on them obeying it.
    block = hs.info_block_size(
        MIN_BLOCK, state.exports.geometry.chunk_size, state.settings.max_payload
    )
    await state.reply(opt, Reply.INFO, block)
    await state.reply(opt, Reply.ACK)
    if path is not None:
        _finish(state, export, path, flags)


async def _export_name(state: _State, opt: int, data: bytes) -> None:
    """The old way in: no error reply exists, so a bad export closes the connection."""
    name = hs.parse_export_name(data)
    state.done = True
    try:
        export = await state.exports.lookup(name)
        path = await state.stack.enter_async_context(state.exports.use(export.tag))
    except (UnknownExportError, ServerUnreachableError) as exc:
        log.info("NBD_OPT_EXPORT_NAME %r: %s; closing", name, exc)
        return
    flags = transmission_flags(state.settings, structured=state.structured)
    size = path.size
    await state.conn.send(hs.export_name_reply(size, flags, no_zeroes=state.no_zeroes))
    _finish(state, export, path, flags)


def _finish(state: _State, export: ExportInfo, path: DataPath, flags: TF) -> None:
    contexts = state.contexts if state.contexts_for == export.name else []
    state.result = Negotiated(export, path, flags, state.structured, contexts, state.conn)
    state.done = True


async def _meta_context(state: _State, opt: int, data: bytes) -> None:
    """LIST_META_CONTEXT (ids 0, as the spec reserves) and SET_META_CONTEXT."""
    if not state.structured:
        raise OptionDataError("metadata contexts need structured replies first")
    request = hs.parse_meta_context_request(data)
    for query in request.queries:
        if not valid_query(query):
            raise OptionDataError(f"query {query!r} does not start with a namespace")
    listing = opt == Option.LIST_META_CONTEXT
    export = await _lookup(state, opt, request.name)
    if export is None:
        if not listing:
            state.contexts, state.contexts_for = [], None
        return
    bases: list[int] = []
    if wants_bases(request.queries, listing=listing):
        # The diff contexts are one per live snapshot: ask csnapd which.
        try:
            bases = await state.exports.snapshot_tags()
        except ServerUnreachableError as exc:
            await state.error(opt, Reply.ERR_POLICY, f"cannot list the diff bases: {exc}")
            if not listing:
                state.contexts, state.contexts_for = [], None
            return
    chosen = select_contexts(request.queries, listing=listing, bases=bases)
    for context in chosen:
        entry = hs.meta_context_entry(0 if listing else context.id, context.name)
        await state.reply(opt, Reply.META_CONTEXT, entry)
    if not listing:
        state.contexts, state.contexts_for = chosen, export.name
    await state.reply(opt, Reply.ACK)


_HANDLERS: dict[int, Callable[[_State, int, bytes], Awaitable[None]]] = {
    Option.EXPORT_NAME: _export_name,
    Option.ABORT: _abort,
    Option.LIST: _list,
    Option.STARTTLS: _starttls,
    Option.INFO: _info,
    Option.GO: _info,
    Option.STRUCTURED_REPLY: _structured,
    Option.LIST_META_CONTEXT: _meta_context,
    Option.SET_META_CONTEXT: _meta_context,
}

"""csnap-nbd speaking NBD over TLS (docs/nbd.md, "TLS"), proved with real
csnapd and csnap-nbd processes, certificates made by scripts/nbd-certs
with openssl, and real clients: nbdinfo and nbdcopy (libnbd, GnuTLS) and
qemu-img/qemu-io (qemu, GnuTLS). A raw client, with Python's ssl for its
side of TLS, checks NBD_OPT_STARTTLS byte by byte and sends garbage
before, during and after the TLS handshake.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from csnap_common.credentials import make_credentials, store_credentials
from csnap_nbd.tls import TlsMode, TlsPolicy, is_loopback, server_context
from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire.constants import IHAVEOPT, Command, Option, Reply
from tests.e2e.processes import ROOT
from tests.nbd.rawclient import WAIT, RawClient
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    Gateway,
    gateway,
    nbdcopy_to_bytes,
    origin_image,
    run,
    stop,
)

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image()
CERTS = ROOT / "scripts" / "nbd-certs"


def require_tools(*tools: str) -> None:
    """Fail (never skip) without a tool: scripts/test installs every one."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (scripts/test installs them)")


def make_certificates(directory: Path) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1/::1 and a client one."""
    require_tools("openssl")
    subprocess.run([str(CERTS), str(directory)], check=True, capture_output=True, timeout=60)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Path:
    """A client directory that trusts our CA but holds a certificate of another CA."""
    other = make_certificates(tmp_path_factory.mktemp("foreign-pki"))
    client = tmp_path_factory.mktemp("foreign-client")
    shutil.copy(pki / "ca-cert.pem", client)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(other / name, client)
    return client


@pytest.fixture(scope="module")
def anonymous(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Path:
    """A client directory that trusts our CA and has no certificate of its own."""
    client = tmp_path_factory.mktemp("anonymous-client")
    shutil.copy(pki / "ca-cert.pem", client)
    return client


def tls_url(gw: Gateway, pki: Path, export: str = "origin", *, unix: bool = False) -> str:
    if unix:
        return f"nbds+unix:///{export}?socket={gw.socket}&tls-certificates={pki}"
    return f"nbds://127.0.0.1:{gw.port}/{export}?tls-certificates={pki}"


def client_context(ca: Path, certificate: Path | None = None) -> ssl.SSLContext:
    """Python's side of TLS: trusts `ca`, presents `certificate`'s client pair."""
    context = ssl.create_default_context(cafile=ca / "ca-cert.pem")
    if certificate is not None:
        context.load_cert_chain(certificate / "client-cert.pem", certificate / "client-key.pem")
    return context


class TlsClient(RawClient):
    """The raw client, able to upgrade with NBD_OPT_STARTTLS."""

    async def starttls(self, context: ssl.SSLContext, hostname: str = "127.0.0.1") -> None:
        """STARTTLS, its ACK, then the handshake; fails the test otherwise."""
        assert await self.option(Option.STARTTLS) == [(Reply.ACK, b"")]
        await self.handshake(context, hostname)

    async def handshake(self, context: ssl.SSLContext, hostname: str = "127.0.0.1") -> None:
        tls = trio.SSLStream(self.channel, context, server_hostname=hostname)
        with trio.fail_after(WAIT):
            await tls.do_handshake()
        self.channel = tls

    async def closed_with_close_notify(self) -> bool:
        """True if the gateway ended TLS with close_notify before closing
        (a TLS stream closed without it raises instead: a truncation)."""
        try:
            with trio.fail_after(WAIT):
                data = await self.channel.receive_some(1 << 16)
        finally:
            await trio.aclose_forcefully(self.channel)
        return data == b""

    async def read_origin(self, offset: int, length: int, cookie: int = 1) -> bytes:
        await self.request(Command.READ, offset, length, cookie=cookie)
        answer = await self.answer(read_length=length)
        assert answer.cookie == cookie and not answer.errors, answer
        return answer.data


async def tls_client(gw: Gateway, pki: Path) -> TlsClient:
    """A raw client in transmission on the origin over TLS."""
    client = await TlsClient.tcp(gw.port)
    await client.greet()
    await client.starttls(client_context(pki, pki))
    assert (await client.option(Option.STRUCTURED_REPLY))[-1][0] == Reply.ACK
    client.structured = True
    assert (await client.option(Option.GO, hs.info_request("origin")))[-1][0] == Reply.ACK
    return client


async def served_over_tls(gw: Gateway, pki: Path) -> None:
    """A fresh TLS client negotiates and reads the right bytes."""
    client = await tls_client(gw, pki)
    assert await client.read_origin(54321, 777) == IMAGE[54321 : 54321 + 777]
    await client.request(Command.DISC)
    assert await client.closed_with_close_notify()


@pytest.fixture
async def required(tmp_path: Path, pki: Path) -> AsyncIterator[Gateway]:
    """csnap-nbd with --tls=require on TCP and a Unix socket, snapshot 1 taken."""
    require_tools("nbdinfo", "nbdcopy")
    async with gateway(
        tmp_path, "--tls=require", f"--tls-certificates={pki}", image=IMAGE
    ) as running:
        await running.create(1)
        yield running


# -- real clients ------------------------------------------------------------------


async def test_require_serves_tls_clients_and_refuses_plaintext(
    required: Gateway, pki: Path, tmp_path: Path
) -> None:
    gw = required
    assert gw.tcp.startswith("nbds://127.0.0.1:")
    info = json.loads((await run("nbdinfo", "--json", tls_url(gw, pki))).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == ORIGIN_SIZE
    listed = await run("nbdinfo", "--list", "--json", tls_url(gw, pki, unix=True))
    names = [e["export-name"] for e in json.loads(listed.stdout)["exports"]]
    assert names == ["origin", "snap-1"]
    assert await nbdcopy_to_bytes(tls_url(gw, pki, "snap-1"), tmp_path) == IMAGE

    for plaintext in (f"nbd://127.0.0.1:{gw.port}/origin", gw.url("origin", unix=True)):
        refused = await run("nbdinfo", "--size", plaintext, check=False)
        assert refused.returncode != 0, refused.stdout
        assert refused.stdout == ""
    listing = await run("nbdinfo", "--list", f"nbd://127.0.0.1:{gw.port}", check=False)
    assert listing.returncode != 0 and "snap-1" not in listing.stdout


async def test_qemu_img_convert_of_a_snapshot_over_tls_matches_the_plaintext_copy(
    tmp_path: Path, pki: Path
) -> None:
    """--tls=on serves both: qemu writes the origin and copies a snapshot
    over TLS, and the copies over TLS and in plaintext are the same bytes."""
    require_tools("qemu-img", "qemu-io")
    creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=client"
    async with gateway(tmp_path, "--tls=on", f"--tls-certificates={pki}", image=IMAGE) as gw:
        assert gw.tcp.startswith("nbd://")
        await gw.create(1)

        def over_tls(export: str, *, unix: bool = False) -> str:
            if unix:
                where = f"server.type=unix,server.path={gw.socket},tls-hostname=localhost"
            else:
                where = f"host=127.0.0.1,port={gw.port}"
            return f"driver=nbd,{where},export={export},tls-creds=tls0"

        # The origin changes after the snapshot, through qemu over TLS.
        await run(
            "qemu-io", "--object", creds, "--image-opts", over_tls("origin"),
            "-c", f"write -P 0x5c {3 * CHUNK + 100} {5 * CHUNK}", "-c", "flush",
        )  # fmt: skip
        plain, tls, tls_unix = tmp_path / "plain.raw", tmp_path / "tls.raw", tmp_path / "unix.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", gw.url("snap-1"), str(plain))
        for export, target in (
            (over_tls("snap-1"), tls),
            (over_tls("snap-1", unix=True), tls_unix),
        ):
            await run(
                "qemu-img", "convert", "-O", "raw", "--object", creds,
                "--image-opts", export, str(target),
            )  # fmt: skip
        assert tls.read_bytes() == plain.read_bytes() == IMAGE
        assert tls_unix.read_bytes() == IMAGE
        expected = bytearray(IMAGE)
        expected[3 * CHUNK + 100 : 8 * CHUNK + 100] = b"\x5c" * (5 * CHUNK)
        origin = tmp_path / "origin.raw"
        await run(
            "qemu-img", "convert", "-O", "raw", "--object", creds,
            "--image-opts", over_tls("origin"), str(origin),
        )  # fmt: skip
        assert origin.read_bytes() == expected
        info = json.loads((await run("nbdinfo", "--json", gw.url("origin"))).stdout)
        assert info["TLS"] is False


async def test_verify_peer_refuses_foreign_and_missing_client_certificates(
    tmp_path: Path, pki: Path, foreign: Path, anonymous: Path
) -> None:
    require_tools("nbdinfo")
    async with gateway(
        tmp_path, f"--tls-certificates={pki}", "--tls-verify-peer", image=IMAGE
    ) as gw:
        for refused_dir in (foreign, anonymous):
            refused = await run("nbdinfo", "--size", tls_url(gw, refused_dir), check=False)
            assert refused.returncode != 0 and refused.stdout == "", refused_dir
        # Python's TLS client with the foreign certificate: whether its own
        # handshake completes (TLS 1.3 checks the client after) or not, the
        # gateway answers nothing and closes.
        for certificate in (foreign, None):
            client = await TlsClient.tcp(gw.port)
            await client.greet()
            assert await client.option(Option.STARTTLS) == [(Reply.ACK, b"")]
            try:
                await client.handshake(client_context(pki, certificate))
                await client.send(hs.option(Option.LIST))
            except trio.BrokenResourceError:
                pass
            assert await client.closed()
        sized = await run("nbdinfo", "--size", tls_url(gw, pki))
        assert int(sized.stdout) == ORIGIN_SIZE
        await served_over_tls(gw, pki)
        # The log says who was let in.
        log = gw.log()
        assert "over TLS (TLSv1.3, " in log and "client commonName=csnap NBD client" in log


# -- NBD_OPT_STARTTLS byte by byte ----------------------------------------------------


async def test_require_refuses_every_option_but_starttls_and_abort(
    required: Gateway, pki: Path
) -> None:
    gw = required
    client = await TlsClient.tcp(gw.port)
    await client.greet()
    for opt, data in (
        (Option.LIST, b""),
        (Option.STRUCTURED_REPLY, b""),
        (Option.INFO, hs.info_request("origin")),
        (Option.GO, hs.info_request("origin")),
        (Option.LIST_META_CONTEXT, hs.meta_context_request("origin", ["base:"])),
        (Option.EXTENDED_HEADERS, b""),
        (999, b"unknown"),
        (Option.LIST, bytes(100_000)),  # too long: skipped, still TLS_REQD
    ):
        replies = await client.option(opt, data)
        assert [r for r, _ in replies] == [Reply.ERR_TLS_REQD], opt
        assert b"STARTTLS" in replies[0][1]
    # STARTTLS with data is malformed, and negotiation goes on in plaintext.
    assert [r for r, _ in await client.option(Option.STARTTLS, b"x")] == [Reply.ERR_INVALID]
    await client.starttls(client_context(pki))
    assert [r for r, _ in await client.option(Option.STARTTLS)] == [Reply.ERR_INVALID]
    replies = await client.option(Option.LIST)
    assert [r for r, _ in replies] == [Reply.SERVER, Reply.SERVER, Reply.ACK]
    assert (await client.option(Option.GO, hs.info_request("snap-1")))[-1][0] == Reply.ACK
    assert await client.read_origin(4095, 9000) == IMAGE[4095:13095]
    await client.request(Command.DISC)
    assert await client.closed()

    # Over TLS, NBD_OPT_EXPORT_NAME works too (its reply is not an option reply).
    client = await TlsClient.unix(gw.socket)
    await client.greet()
    await client.starttls(client_context(pki), hostname="localhost")
    await client.send(hs.option(Option.EXPORT_NAME, b"snap-1"))
    size, _flags = struct.unpack(">QH", await client.receive(10))
    assert size == ORIGIN_SIZE
    assert await client.read_origin(ORIGIN_SIZE - 100, 100) == IMAGE[-100:]
    await client.request(Command.DISC)
    assert await client.closed()

    # ABORT is answered before TLS; EXPORT_NAME, which has no error reply, closes.
    client = await TlsClient.unix(gw.socket)
    await client.greet()
    assert await client.option(Option.ABORT) == [(Reply.ACK, b"")]
    assert await client.closed()
    client = await TlsClient.tcp(gw.port)
    await client.greet()
    await client.send(hs.option(Option.EXPORT_NAME, b"origin"))
    assert await client.closed()


async def test_starttls_forgets_what_was_negotiated_before(tmp_path: Path, pki: Path) -> None:
    async with gateway(tmp_path, "--tls=on", f"--tls-certificates={pki}", image=IMAGE) as gw:
        client = await TlsClient.unix(gw.socket)
        await client.greet()
        # --tls=on: plaintext negotiation works...
        assert (await client.option(Option.STRUCTURED_REPLY))[-1][0] == Reply.ACK
        query = hs.meta_context_request("origin", ["base:allocation"])
        assert (await client.option(Option.SET_META_CONTEXT, query))[-1][0] == Reply.ACK
        # ...and STARTTLS starts over: no structured replies, no contexts.
        await client.starttls(client_context(pki, pki), hostname="localhost")
        replies = await client.option(Option.LIST_META_CONTEXT, query)
        assert [r for r, _ in replies] == [Reply.ERR_INVALID]
        assert (await client.option(Option.GO, hs.info_request("origin")))[-1][0] == Reply.ACK
        await client.request(Command.READ, 10, 20, cookie=3)
        answer = await client.answer(read_length=20)
        assert answer.chunks == [] and answer.data == IMAGE[10:30]  # a simple reply
        await client.request(Command.BLOCK_STATUS, 0, CHUNK, cookie=4)
        assert (await client.answer()).errors == [22]  # EINVAL: no context selected
        await client.request(Command.DISC)
        assert await client.closed()


async def test_sigterm_ends_tls_connections_with_close_notify(tmp_path: Path, pki: Path) -> None:
    async with gateway(tmp_path, f"--tls-certificates={pki}", image=IMAGE) as gw:
        serving = await tls_client(gw, pki)
        assert await serving.read_origin(0, 100) == IMAGE[:100]
        negotiating = await TlsClient.unix(gw.socket)
        await negotiating.greet()
        await negotiating.starttls(client_context(pki), hostname="localhost")
        assert await stop(gw.nbd) == 0
        assert await serving.closed_with_close_notify()
        assert await negotiating.closed_with_close_notify()


async def test_starttls_with_tls_off_is_unsupported(tmp_path: Path) -> None:
    async with gateway(tmp_path, image=IMAGE) as gw:
        client = await TlsClient.tcp(gw.port)
        await client.greet()
        assert [r for r, _ in await client.option(Option.STARTTLS)] == [Reply.ERR_UNSUP]
        assert (await client.option(Option.GO, hs.info_request("origin")))[-1][0] == Reply.ACK
        assert await client.read_origin(0, 512) == IMAGE[:512]
        await client.request(Command.DISC)
        assert await client.closed()


# -- hostile input around the TLS handshake ----------------------------------------------


async def test_garbage_before_during_and_after_the_tls_handshake_closes_only_that_connection(
    required: Gateway, pki: Path
) -> None:
    gw = required
    steady = await tls_client(gw, pki)
    cookie = 100

    async def steady_still_served() -> None:
        nonlocal cookie
        cookie += 1
        offset = (cookie * 7919) % (ORIGIN_SIZE - 4096)
        assert await steady.read_origin(offset, 4096, cookie) == IMAGE[offset : offset + 4096]

    async def fresh() -> TlsClient:
        client = await TlsClient.tcp(gw.port)
        await client.greet()
        return client

    def garbage(seed: int, size: int = 517) -> bytes:
        return bytes((seed * 31 + i * 131) % 256 for i in range(size))

    # Before: bytes that are not NBD where the client flags and options go.
    client = await TlsClient.tcp(gw.port)
    await client.receive(hs.GREETING.size)
    await client.send(garbage(1))
    assert await client.closed()
    client = await fresh()
    await client.send(garbage(2, 16))  # no IHAVEOPT
    assert await client.closed()
    client = await fresh()
    await client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + garbage(3, 64))
    assert await client.closed()  # a TLS ClientHello without STARTTLS
    await steady_still_served()

    # During: after the ACK, something that is not a TLS handshake.
    for junk in (garbage(4), b"\x16\x03\x01\x00\x05\x01\x00", b"\x16\x03\x03\xff\xff" + garbage(5)):
        client = await fresh()
        assert await client.option(Option.STARTTLS) == [(Reply.ACK, b"")]
        await client.send(junk)
        if len(junk) < 10:  # a cut-off record: the client gives up
            await client.aclose()
        else:
            assert await client.closed()
        await steady_still_served()
    # Bytes sent with STARTTLS, before its reply: refused, not fed to TLS.
    client = await fresh()
    await client.send(hs.option(Option.STARTTLS) + b"\x16\x03\x01" + garbage(6, 40))
    assert await client.closed()
    await steady_still_served()

    # After: TLS is up, then bytes that are not TLS records on the socket...
    client = await fresh()
    await client.starttls(client_context(pki))
    assert isinstance(client.channel, trio.SSLStream)
    await client.stream.send_all(garbage(7))
    assert await client.closed()
    # ...or TLS records carrying no NBD option...
    client = await fresh()
    await client.starttls(client_context(pki))
    await client.send(garbage(8, 16))
    assert await client.closed()
    # ...or a request that breaks framing once in transmission.
    client = await tls_client(gw, pki)
    await client.send(garbage(9, 28))
    assert await client.closed()
    # ...or going away in the middle of an option.
    client = await fresh()
    await client.starttls(client_context(pki))
    await client.send(hs.OPTION_HEADER.pack(IHAVEOPT, Option.LIST, 0)[:9])
    await client.aclose()

    await steady_still_served()
    await served_over_tls(gw, pki)
    await steady.request(Command.DISC)
    assert await steady.closed()


# -- starting ---------------------------------------------------------------------------


async def start_expecting_failure(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "csnap_nbd", *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def test_plaintext_outside_loopback_is_refused_with_how_to_make_certificates(
    pki: Path, tmp_path: Path
) -> None:
    # Refused before csnapd is looked for: nothing listens at this address.
    files = tmp_path / "origin.img", tmp_path / "store.img"
    make_credentials(store_credentials(files[1]))  # csnapd's, beside the store
    nobody = ["--server", "127.0.0.1:1", "--origin", str(files[0]), "--store", str(files[1])]
    for listen in ("0.0.0.0:0", "[::]:0"):
        done = await start_expecting_failure(*nobody, "--listen", listen)
        assert done.returncode == 3, done.stderr
        assert "--tls=require --tls-certificates=DIR" in done.stderr
        assert "scripts/nbd-certs" in done.stderr and "--tls=off" in done.stderr
        assert done.stdout == ""
    # Contradictory or incomplete TLS options are usage errors.
    for argv, complaint in (
        (["--tls=require"], "needs --tls-certificates"),
        (["--tls=on"], "needs --tls-certificates"),
        (["--tls=off", f"--tls-certificates={pki}"], "--tls-certificates with --tls=off"),
        (["--tls-verify-peer"], "--tls-verify-peer needs TLS"),
    ):
        done = await start_expecting_failure(*nobody, *argv)
        assert done.returncode == 2 and complaint in done.stderr, (argv, done.stderr)
    # Certificates that cannot be loaded: a clear message, exit status 3.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(pki / "server-cert.pem", broken)
    done = await start_expecting_failure(*nobody, f"--tls-certificates={broken}")
    assert done.returncode == 3 and "server-key.pem not found" in done.stderr
    (broken / "server-key.pem").write_text("not a key\n")
    done = await start_expecting_failure(*nobody, f"--tls-certificates={broken}")
    assert done.returncode == 3 and f"cannot load {broken / 'server-cert.pem'}" in done.stderr


# -- the policy's pieces ------------------------------------------------------------------


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.1", "fe80::1%eth0", "::ffff:192.0.2.1", "localhost"):
        assert not is_loopback(host), host


def test_policy_has_a_context_exactly_when_tls_is_on(pki: Path) -> None:
    with pytest.raises(ValueError):
        TlsPolicy(TlsMode.ON)
    with pytest.raises(ValueError):
        TlsPolicy(TlsMode.OFF, server_context(pki))
    assert not TlsPolicy(TlsMode.REQUIRE, server_context(pki)).verify_peer
    checking = TlsPolicy(TlsMode.REQUIRE, server_context(pki, verify_peer=True))
    assert checking.verify_peer and checking.scheme == "nbds"
    assert TlsPolicy(TlsMode.ON, server_context(pki)).scheme == "nbd"


def test_a_key_others_can_read_is_warned_about(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(pki / name, tmp_path)
    with caplog.at_level("WARNING", logger="csnap.nbd.tls"):
        server_context(tmp_path)
        assert caplog.messages == []
        (tmp_path / "server-key.pem").chmod(0o644)
        server_context(tmp_path)
    assert caplog.messages == [
        f"{tmp_path / 'server-key.pem'} can be read by other users (mode 644): make it 0600"
    ]

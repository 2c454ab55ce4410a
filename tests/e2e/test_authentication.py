"""Authentication on csnapd's TCP port, against a real csnapd process
(docs/protocol.md, "Authentication"; docs/operations.md, "Securing a
cluster"): a peer without a credential of the cluster gets an
authentication error or a failed TLS handshake and nothing else, and
changes nothing; a data-path credential may not administer; credentials
are made by themselves on loopback and required elsewhere.
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from csnap_client import (
    AdminClient,
    AuthenticationError,
    Connector,
    ServerError,
    open_admin,
    open_client,
    tcp_connector,
)
from csnap_common.credentials import (
    CA_CERT,
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_SERVER,
    cert_file,
    client_context,
    issue_credential,
    key_file,
    load_ca,
    make_credentials,
    store_credentials,
)
from csnap_format.mkcsnap import format_store
from csnap_protocol import ErrorCode, encode_frame
from csnap_protocol.messages import CreateSnapshot
from tests.credentials import connector
from tests.e2e.processes import ROOT, start, start_csnapd, tail
from tests.torture.hostile import hello_frame
from tests.torture.support import RawPeer


def make(tmp_path: Path) -> tuple[Path, Path]:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=16 << 20)
    return store, origin


async def state(admin: AdminClient) -> tuple[object, ...]:
    """What a refused peer must not have changed."""
    status = await admin.status()
    return (status.store.data_free, status.snapshots, status.deleting)


def credential_of(directory: Path, role: str, *, trust: Path, cert: bytes, key: bytes) -> Path:
    """A credential directory trusting `trust`'s CA and holding `cert` for `role`."""
    directory.mkdir(mode=0o700)
    shutil.copy(trust / CA_CERT, directory / CA_CERT)
    (directory / cert_file(role)).write_bytes(cert)
    (directory / key_file(role)).write_bytes(key)
    return directory


async def refused_at_hello(host: str, port: int, directory: Path, role: str) -> ServerError:
    """Opening an admin session with this credential fails; how."""
    with pytest.raises(ServerError) as refused:
        async with open_admin(connector_for(host, port, directory, role)):
            pass
    return refused.value


def connector_for(host: str, port: int, directory: Path, role: str) -> Connector:
    return tcp_connector(host, port, client_context(directory, role))


async def test_a_peer_without_a_credential_of_the_cluster_gets_nothing(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    daemon, host, port = await start_csnapd(store, origin, tmp_path / "csnapd.log")
    keys = store_credentials(store)
    try:
        with trio.fail_after(60):
            async with open_admin(connector(host, port, store)) as admin:
                await admin.create_snapshot(1)
                before = await state(admin)

                # Plaintext: the csnap hello and an admin request, pipelined.
                raw = RawPeer(await trio.open_tcp_stream(host, port))
                await raw.send(hello_frame("admin") + encode_frame(CreateSnapshot(1, 2, 0)))
                heard = await raw.listen(5)
                await raw.aclose()
                assert [f["name"] for f in heard.frames] == ["authentication_failed"], heard
                assert heard.frames[0]["code"] == int(ErrorCode.AUTHENTICATION_FAILED) == 30

                # Garbage inside the TLS handshake: a handshake record header,
                # then noise. The handshake fails; no csnap byte comes back.
                raw = RawPeer(await trio.open_tcp_stream(host, port))
                await raw.send(b"\x16\x03\x01\x00\x40" + os.urandom(64) + hello_frame("admin"))
                heard = await raw.listen(5)
                await raw.aclose()
                assert heard.frames == [] and b"csnap" not in heard.rest, heard

                # Another cluster's credentials: csnapd is not trusted either way.
                other = tmp_path / "other-cluster"
                make_credentials(other)
                refused = await refused_at_hello(host, port, other, ROLE_ADMIN)
                assert isinstance(refused, AuthenticationError), refused

                # A foreign certificate: trusting our CA, showing another's.
                other_cert, other_key = issue_credential(*load_ca(other), ROLE_ADMIN)
                foreign = credential_of(
                    tmp_path / "foreign", ROLE_ADMIN, trust=keys, cert=other_cert, key=other_key
                )
                refused = await refused_at_hello(host, port, foreign, ROLE_ADMIN)
                assert isinstance(refused, AuthenticationError), refused

                # Our CA's, but expired.
                long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
                old_cert, old_key = issue_credential(
                    *load_ca(keys), ROLE_ADMIN, not_before=long_ago, days=1
                )
                expired = credential_of(
                    tmp_path / "expired", ROLE_ADMIN, trust=keys, cert=old_cert, key=old_key
                )
                refused = await refused_at_hello(host, port, expired, ROLE_ADMIN)
                assert isinstance(refused, AuthenticationError), refused

                # csnapd's own server credential is no client's.
                refused = await refused_at_hello(host, port, keys, ROLE_SERVER)
                assert isinstance(refused, AuthenticationError), refused

                assert await state(admin) == before
            assert daemon.process.returncode is None
            log = (tmp_path / "csnapd.log").read_text()
            assert "spoke without TLS" in log and "failed authentication" in log
    finally:
        assert await daemon.stop() == 0, tail(tmp_path / "csnapd.log")


async def test_a_data_path_credential_may_not_administer(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    daemon, host, port = await start_csnapd(store, origin, tmp_path / "csnapd.log")
    try:
        with trio.fail_after(60):
            async with open_admin(connector(host, port, store)) as admin:
                await admin.create_snapshot(1)
                before = await state(admin)
                data_path = connector(host, port, store, ROLE_CLIENT)
                async with open_admin(data_path) as reader:
                    # What a gateway asks at start: it only reads.
                    assert [s["tag"] for s in await reader.list_snapshots()] == [1]
                    await reader.status()
                    await reader.server_info()
                    attempts = [
                        reader.create_snapshot(2),
                        reader.delete_snapshot(1),
                        reader.revert_snapshot(1),
                        reader.set_priority(1, 5),
                        reader.change_use_count(1, 1),
                        reader.shutdown(),
                    ]
                    for attempt in attempts:
                        with pytest.raises(ServerError) as refused:
                            await attempt
                        assert refused.value.error is ErrorCode.NOT_PERMITTED, refused.value
                # The data path itself is what it is for.
                async with (
                    open_client(data_path, snapshot=1) as client,
                    client.snapshot_read([(0, 1)]) as plan,
                ):
                    assert plan.origin == ((0, 1),)
                assert await state(admin) == before
            assert daemon.process.returncode is None
    finally:
        assert await daemon.stop() == 0, tail(tmp_path / "csnapd.log")


def csnapd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "csnapd", *args]


async def test_credentials_are_made_on_loopback_and_required_beyond_it(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Beyond loopback and without credentials: refused before it listens.
    with trio.fail_after(60):
        result = await trio.run_process(
            csnapd_argv(str(store), str(origin), "--listen", "0.0.0.0:0"),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert result.returncode == 3, result.stderr
    assert b"csnap keys DIR" in result.stderr and b"--credentials DIR" in result.stderr
    assert result.stdout == b""
    assert not store_credentials(store).exists()

    # `csnap keys DIR`: a CA and the three credentials, for the owner only.
    keys = tmp_path / "keys"
    with trio.fail_after(60):
        made = await trio.run_process(
            [sys.executable, "-m", "csnap_agent.ctl", "keys", str(keys)],
            capture_stdout=True,
            check=False,
            env=env,
        )
    assert made.returncode == 0
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    names = sorted(path.name for path in keys.iterdir())
    assert names == sorted(
        [CA_CERT, "ca-key.pem"]
        + [f"{r}-{k}.pem" for r in ("server", "admin", "client") for k in ("cert", "key")]
    )
    assert all(stat.S_IMODE((keys / name).stat().st_mode) == 0o600 for name in names)
    assert made.stdout.decode().split() == [str(keys / name) for name in _made_order()]

    # csnapd takes them with --credentials (and makes none beside the store).
    daemon = await start(
        ["csnapd", str(store), str(origin), "--credentials", str(keys)], tmp_path / "csnapd.log"
    )
    try:
        address, _, number = daemon.first_line.removeprefix("listening ").rpartition(":")
        with trio.fail_after(30):
            async with open_admin(connector_for(address, int(number), keys, ROLE_ADMIN)) as admin:
                await admin.create_snapshot(4)
            # The store's own zero-configuration credentials are not this cluster's.
            assert not store_credentials(store).exists()
    finally:
        assert await daemon.stop() == 0, tail(tmp_path / "csnapd.log")

    # Bare csnapd on loopback: made beside the store, then used again.
    daemon, host, port = await start_csnapd(store, origin, tmp_path / "csnapd.log")
    try:
        made_beside = store_credentials(store)
        assert stat.S_IMODE(made_beside.stat().st_mode) == 0o700
        ca = (made_beside / CA_CERT).read_bytes()
        with trio.fail_after(30):
            async with open_admin(connector(host, port, store)) as admin:
                assert [s["tag"] for s in await admin.list_snapshots()] == [4]
    finally:
        assert await daemon.stop() == 0, tail(tmp_path / "csnapd.log")
    daemon, host, port = await start_csnapd(store, origin, tmp_path / "csnapd.log")
    try:
        assert (made_beside / CA_CERT).read_bytes() == ca
    finally:
        assert await daemon.stop() == 0, tail(tmp_path / "csnapd.log")


def _made_order() -> list[str]:
    return ["ca-key.pem", CA_CERT] + [
        name for role in ("server", "admin", "client") for name in (key_file(role), cert_file(role))
    ]


def test_csnap_keys_rotates_credentials_under_the_same_ca(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_credentials(keys)
    ca = (keys / CA_CERT).read_bytes()
    client = (keys / cert_file(ROLE_CLIENT)).read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "csnap_agent.ctl", "keys", str(keys), "--role", "client"],
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (keys / CA_CERT).read_bytes() == ca
    assert (keys / cert_file(ROLE_CLIENT)).read_bytes() != client
    assert result.stdout.decode().split() == [
        str(keys / key_file(ROLE_CLIENT)),
        str(keys / cert_file(ROLE_CLIENT)),
    ]

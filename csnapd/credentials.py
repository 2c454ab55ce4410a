"""Which credentials csnapd serves with, and making them when nobody has to.

With --credentials DIR, csnapd uses DIR's server credential. Without, it
uses "STORE.keys" beside its store; when that has no server credential and
csnapd listens on loopback only, it makes a cluster CA and the server,
admin and client credentials there itself (zero configuration: only users
of this machine who can read that directory can connect). Listening
anywhere else without credentials is refused with how to make them.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
from pathlib import Path
from typing import Protocol

from csnap_common.credentials import (
    ROLE_SERVER,
    CredentialsError,
    has_credential,
    is_loopback,
    make_credentials,
    server_context,
    store_credentials,
)

__all__ = ["CredentialsError", "credentials_directory", "server_tls"]

log = logging.getLogger("csnapd")


class _Config(Protocol):
    @property
    def store(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def credentials(self) -> Path | None: ...


def credentials_directory(config: _Config) -> Path:
    """The directory csnapd takes its credentials from, made if it may be.

    Raises:
        CredentialsError: none there and csnapd may not make them.
    """
    if config.credentials is not None:
        return config.credentials
    directory = store_credentials(config.store)
    if has_credential(directory, ROLE_SERVER):
        return directory
    if not is_loopback(config.host):
        raise CredentialsError(
            f"csnapd listens on {config.host}, beyond this machine, and {directory} holds"
            " no credentials: make a cluster's with `csnap keys DIR` and start csnapd"
            " with --credentials DIR (docs/operations.md, 'Securing a cluster')"
        )
    if not Path(config.store).is_file():
        raise CredentialsError(
            f"the store {config.store} is not a file, so no credentials are made beside it:"
            " make them with `csnap keys DIR` and start csnapd with --credentials DIR"
        )
    _make_beside_store(directory)
    log.info(
        "made credentials for this store in %s",
        directory,
        extra={"event": "credentials.made", "directory": str(directory)},
    )
    return directory


def _make_beside_store(directory: Path) -> None:
    """Make the credentials aside, then move them into place in one rename:
    two servers starting on one store at once end up using the same ones."""
    partial = directory.with_name(f"{directory.name}.new-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    make_credentials(partial)
    try:
        os.rename(partial, directory)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if not has_credential(directory, ROLE_SERVER):
            raise CredentialsError(f"cannot make credentials in {directory}: {exc}") from exc


def server_tls(config: _Config) -> ssl.SSLContext:
    """csnapd's TLS context (see credentials_directory()).

    Raises:
        CredentialsError: no usable credentials.
    """
    return server_context(credentials_directory(config))

"""A small etcd v3 client over etcd's JSON gateway (HTTP), for trio.

Only what the agent's election needs: leases (grant, keep alive once,
revoke), a key's current value, a create-if-absent transaction bound to a
lease, a delete guarded by the key's creation revision, and a watch of one
key; and for the candidates' keys, a put bound to a lease, a delete and
the keys under a prefix. Keys and values are bytes; the gateway carries them base64-encoded and
64-bit integers as decimal strings, which this module hides.

Endpoints are tried in turn: a request that cannot reach one (refused,
timed out, a 5xx answer) goes to the next, and the one that answered is
tried first next time. Errors are translated into EtcdError at this
boundary.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

__all__ = ["EtcdClient", "EtcdError", "KeyValue", "WatchEvent"]

log = logging.getLogger("csnap-agent.etcd")

#: Seconds one request may take before the next endpoint is tried.
REQUEST_TIMEOUT = 2.0


class EtcdError(Exception):
    """etcd could not be reached, or refused or garbled a request."""


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it."""

    key: bytes
    value: bytes
    #: Revision of the put that created the key (since its last deletion).
    create_revision: int
    mod_revision: int
    #: The lease the key is bound to; 0 for none.
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    """A change to a watched key: a put (with its new value) or a delete."""

    deleted: bool
    kv: KeyValue | None
    #: The store revision the event happened at.
    revision: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        return b""
    return base64.b64decode(text)


def _int(value: object) -> int:
    """A 64-bit integer as the gateway writes it (a decimal string; absent is 0)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    raise EtcdError(f"etcd sent {value!r} where a number belongs")


def _key_value(raw: object) -> KeyValue:
    if not isinstance(raw, dict):
        raise EtcdError(f"etcd sent {raw!r} where a key belongs")
    return KeyValue(
        key=_unb64(raw.get("key")),
        value=_unb64(raw.get("value")),
        create_revision=_int(raw.get("create_revision")),
        mod_revision=_int(raw.get("mod_revision")),
        lease=_int(raw.get("lease")),
    )


class EtcdClient:
    """Requests to an etcd cluster through its gateway; use as an async context."""

    def __init__(self, endpoints: Sequence[str]):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        # etcd is reached directly: a proxy from the environment is not for it.
        self._http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT, trust_env=False)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` on the first endpoint that answers.

        Raises:
            EtcdError: no endpoint answered, or one refused the request.
        """
        problems = []
        for endpoint in list(self.endpoints):
            try:
                response = await self._http.post(endpoint + path, json=body)
            except httpx.HTTPError as exc:
                problems.append(f"{endpoint}: {exc!r}")
                continue
            if response.status_code >= 500:
                problems.append(f"{endpoint}: HTTP {response.status_code}")
                continue
            if endpoint != self.endpoints[0]:
                self.endpoints.remove(endpoint)
                self.endpoints.insert(0, endpoint)
            try:
                answer = response.json()
            except ValueError as exc:
                raise EtcdError(f"{endpoint}{path}: not JSON: {response.text[:200]}") from exc
            if response.status_code != 200 or not isinstance(answer, dict):
                raise EtcdError(f"{endpoint}{path}: HTTP {response.status_code}: {answer}")
            if "error" in answer:
                raise EtcdError(f"{endpoint}{path}: {answer['error']}")
            return answer
        raise EtcdError("; ".join(problems) or "no etcd endpoint")

    # -- leases ------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id."""
        answer = await self._post("/v3/lease/grant", {"TTL": ttl})
        lease = _int(answer.get("ID"))
        if not lease:
            raise EtcdError(f"lease grant answered {answer}")
        return lease

    async def keep_alive(self, lease: int) -> int:
        """Renew `lease` once; returns the seconds it now lasts (0: it expired)."""
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result")
        if not isinstance(result, dict):
            raise EtcdError(f"lease keepalive answered {answer}")
        return _int(result.get("TTL"))

    async def revoke(self, lease: int) -> None:
        """End `lease` now, deleting the keys bound to it."""
        await self._post("/v3/kv/lease/revoke", {"ID": str(lease)})

    # -- keys --------------------------------------------------------------------

    async def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """The key's current value (None if absent) and the store revision."""
        answer = await self._post("/v3/kv/range", {"key": _b64(key)})
        revision = _int(answer.get("header", {}).get("revision"))
        kvs = answer.get("kvs") or []
        return (_key_value(kvs[0]) if kvs else None), revision

    async def create(self, key: bytes, value: bytes, lease: int) -> tuple[bool, KeyValue | None]:
        """Put `key` bound to `lease` only if it does not exist.

        Returns whether this put created it, and the key as it now is (the
        winner's, when another holds it; None if it vanished meanwhile).
        """
        answer = await self._post(
            "/v3/kv/txn",
            {
                "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
                "success": [
                    {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}},
                    {"request_range": {"key": _b64(key)}},
                ],
                "failure": [{"request_range": {"key": _b64(key)}}],
            },
        )
        created = bool(answer.get("succeeded"))
        responses = answer.get("responses") or []
        current = None
        for response in responses:
            ranged = response.get("response_range") if isinstance(response, dict) else None
            if isinstance(ranged, dict) and ranged.get("kvs"):
                current = _key_value(ranged["kvs"][0])
        return created, current

    async def put(self, key: bytes, value: bytes, lease: int) -> None:
        """Put `key` bound to `lease` (it goes when the lease does)."""
        await self._post(
            "/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
        )

    async def delete(self, key: bytes) -> None:
        """Delete `key` if it exists."""
        await self._post("/v3/kv/deleterange", {"key": _b64(key)})

    async def get_prefix(self, prefix: bytes) -> list[KeyValue]:
        """Every key that starts with `prefix`, in key order.

        `prefix` must end in a byte below 0xFF (a "/", say): the range ends
        where that byte is one larger.
        """
        if not prefix or prefix[-1] == 0xFF:
            raise ValueError(f"prefix {prefix!r} does not end in a byte below 0xff")
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        answer = await self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return [_key_value(raw) for raw in answer.get("kvs") or []]

    async def delete_if_created(self, key: bytes, create_revision: int) -> bool:
        """Delete `key` if it is still the one created at `create_revision`."""
        answer = await self._post(
            "/v3/kv/txn",
            {
                "compare": [
                    {
                        "key": _b64(key),
                        "target": "CREATE",
                        "create_revision": str(create_revision),
                    }
                ],
                "success": [{"request_delete_range": {"key": _b64(key)}}],
            },
        )
        return bool(answer.get("succeeded"))

    # -- watching ----------------------------------------------------------------

    @asynccontextmanager
    async def watch(
        self, key: bytes, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        """Events on `key` from `start_revision` on, as a stream; ends when etcd does.

        Raises:
            EtcdError: no endpoint accepted the watch.
        """
        body = {"create_request": {"key": _b64(key), "start_revision": str(start_revision)}}
        problems = []
        for endpoint in list(self.endpoints):
            try:
                request = self._http.build_request(
                    "POST",
                    endpoint + "/v3/watch",
                    json=body,
                    timeout=httpx.Timeout(REQUEST_TIMEOUT, read=None),
                )
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                problems.append(f"{endpoint}: {exc!r}")
                continue
            try:
                if response.status_code != 200:
                    problems.append(f"{endpoint}: HTTP {response.status_code}")
                    continue
                yield _events(response)
                return
            finally:
                # Also when the watch is cancelled: the connection goes, not back to the pool.
                with trio.move_on_after(REQUEST_TIMEOUT) as closing:
                    closing.shield = True
                    await response.aclose()
        raise EtcdError("; ".join(problems) or "no etcd endpoint")


async def _events(response: httpx.Response) -> AsyncIterator[WatchEvent]:
    try:
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError as exc:
                raise EtcdError(f"watch sent a line that is not JSON: {line[:200]}") from exc
            result = message.get("result") if isinstance(message, dict) else None
            if not isinstance(result, dict):
                raise EtcdError(f"watch failed: {message}")
            if result.get("canceled"):
                raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
            revision = _int(result.get("header", {}).get("revision"))
            for event in result.get("events") or []:
                kv = event.get("kv")
                yield WatchEvent(
                    deleted=event.get("type") == "DELETE",
                    kv=_key_value(kv) if kv else None,
                    revision=revision,
                )
    except httpx.HTTPError as exc:
        raise EtcdError(f"the watch broke: {exc!r}") from exc

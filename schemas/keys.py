"""Names the pipeline owns outside the message bodies: tenants, where results live in Redis,
and the request attributes only the pipeline may write.

Redis layout (``prefix`` is the topic prefix, empty in production):

- ``<prefix>result:<tenant>:<id>``: the stored result (MessagePack ``ResultV1``), with a TTL;
- ``<prefix>results-ready:<tenant>``: the tenant's notification channel. Persist publishes
  on it once per batch, after the batch's writes: a MessagePack array of the ids it just
  stored for that tenant (:func:`ready_message`, :func:`ready_ids`). A subscriber of one
  tenant's channel hears of no other tenant's ids.

A record's tenant is its ``streaminfer.tenant`` header (:data:`Headers.TENANT`), which ingest
sets from the API key; a record without one (a Kafka producer that bypasses HTTP, a backfill)
belongs to the configured default tenant. The tenant segment is percent-encoded, so it never
contains a colon and ``result:<tenant>:<id>`` splits one way only whatever the id holds;
configured tenant names (:data:`TENANT_NAME`) encode to themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import msgspec

DEFAULT_TENANT: Final = "default"
TENANT_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
"""What a configured tenant name may be: letters, digits, ``_ . -``, at most 64."""

RESERVED_ATTRIBUTES: Final = frozenset({"source", "backfill_id", "file", "row", "original_id"})
"""Attribute names the pipeline writes itself (backfill, replay, export trust them)."""
RESERVED_ATTRIBUTE_PREFIX: Final = "streaminfer."


def is_tenant_name(name: str) -> bool:
    return TENANT_NAME.fullmatch(name) is not None


def tenant_of(header: bytes | None, default: str) -> str:
    """The tenant a record belongs to: its tenant header's value, else ``default``.

    Kafka producers are trusted, so a header they set is honoured as it is (any bytes:
    :class:`ResultKeys` encodes it, it never splits a key)."""
    if not header:
        return default
    return header.decode("utf-8", errors="replace")


def reserved_attributes(attributes: Mapping[str, object]) -> list[str]:
    """The names in ``attributes`` that only the pipeline may write, sorted."""
    return sorted(
        name
        for name in attributes
        if name in RESERVED_ATTRIBUTES or name.startswith(RESERVED_ATTRIBUTE_PREFIX)
    )


@dataclass(frozen=True, slots=True)
class ResultKeys:
    """The Redis key of a tenant's result and the tenant's notification channel (see the
    module docstring)."""

    prefix: str = ""

    def key(self, tenant: str, request_id: str) -> str:
        return self.key_prefix(tenant) + request_id

    def key_prefix(self, tenant: str) -> str:
        """What every key of ``tenant`` starts with (the id follows)."""
        return f"{self.prefix}result:{_segment(tenant)}:"

    def channel(self, tenant: str) -> str:
        return f"{self.prefix}results-ready:{_segment(tenant)}"

    def channel_pattern(self) -> str:
        """A ``PSUBSCRIBE`` pattern matching every tenant's channel (under this prefix)."""
        return f"{_glob_escape(self.prefix)}results-ready:*"


_READY_ENCODER: Final = msgspec.msgpack.Encoder()
_READY_DECODER: Final = msgspec.msgpack.Decoder(list[str])


def ready_message(ids: Iterable[str]) -> bytes:
    """The notification of a batch of stored ids (one tenant's): a MessagePack array of str."""
    return _READY_ENCODER.encode(list(ids))


def ready_ids(payload: bytes) -> list[str]:
    """The ids in a notification; ``ValueError`` when ``payload`` is not one."""
    try:
        return _READY_DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(f"not a result notification: {exc}") from exc


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _segment(tenant: str) -> str:
    # quote() keeps letters, digits and "_.-~": a configured name is unchanged, anything
    # else (a colon above all) is escaped, and distinct tenants stay distinct.
    return quote(tenant, safe="")

"""Deterministic names: backfill ids, file keys and request ids.

A request id is a pure function of (backfill id, file identity, row number), so sending a
row again -- after a crash, on ``--resume``, or by running the same backfill twice -- reuses
its id, and every id-keyed store downstream (Redis, the export) keeps one result per row.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from pathlib import Path
from typing import Final

BACKFILL_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_MAX_REQUEST_ID: Final = 256  # RequestV1.id's limit


def new_backfill_id(prefix: str = "bf", now: float | None = None) -> str:
    """``<prefix>-YYYYmmdd-HHMMSS-xxxx`` (UTC), unique enough for a person to type back."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def check_backfill_id(backfill_id: str) -> str:
    """``backfill_id`` unchanged, or ``ValueError`` saying what a valid one looks like."""
    if not BACKFILL_ID_PATTERN.match(backfill_id):
        raise ValueError(
            f"invalid backfill id {backfill_id!r}: 1-64 characters, letters, digits, '_', '.', "
            "'-', starting with a letter or digit"
        )
    return backfill_id


def file_key(path: Path) -> str:
    """12 hex digits naming a file by its absolute, resolved path.

    The path, not the content, is the identity: two copies of one file under different
    names are two inputs. The checkpoint separately records a content fingerprint so that
    ``--resume`` refuses a file that changed in between.
    """
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


def request_id(backfill_id: str, key: str, row: int) -> str:
    """``<backfill id>:<file key>:<row>`` -- at most 64 + 1 + 12 + 1 + 20 characters."""
    return f"{backfill_id}:{key}:{row}"


def replay_request_id(replay_id: str, original_id: str) -> str:
    """``<replay id>:<original id>``; the original part is hashed when the whole would be
    longer than a request id may be."""
    candidate = f"{replay_id}:{original_id}"
    if len(candidate) <= _MAX_REQUEST_ID:
        return candidate
    digest = hashlib.sha256(original_id.encode()).hexdigest()[:32]
    return f"{replay_id}:sha256-{digest}"

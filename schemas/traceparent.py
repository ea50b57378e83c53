"""W3C trace context (``traceparent``) values: the only place they are made.

Format: ``00-<32 hex trace id>-<16 hex span id>-01`` (version 00, sampled). Ids come from the
process's PRNG (``random.getrandbits``), not ``os.urandom``: they must be unique, not secret,
and this saves two system calls per record on the hot paths (ingest, every stage output).
``random`` reseeds itself in a forked child, so uvicorn and stage workers draw distinct ids.
"""

from __future__ import annotations

import random


def new_traceparent() -> bytes:
    """A fresh trace: random trace and span ids, sampled."""
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01".encode()


def child_traceparent(parent: bytes | None) -> bytes:
    """Same trace as ``parent``, new span id; a fresh trace when ``parent`` is malformed."""
    if parent is not None:
        parts = parent.split(b"-")
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            span = f"{random.getrandbits(64):016x}".encode()
            return b"-".join((parts[0], parts[1], span, parts[3]))
    return new_traceparent()

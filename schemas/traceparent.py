"""W3C trace context (``traceparent``) values: the only place they are made.

Format: ``00-<32 hex trace id>-<16 hex span id>-01`` (version 00, sampled). Ids come from the
process's PRNG (``random.getrandbits``), not ``os.urandom``: they must be unique, not secret,
and this saves two system calls per record on the hot paths (ingest, every stage output).
``random`` reseeds itself in a forked child, so uvicorn and stage workers draw distinct ids.
"""

from __future__ import annotations

import random
from typing import Final

_getrandbits: Final = random.getrandbits
# The usual form: "00-" 32 hex "-" 16 hex "-" 2 hex (dashes at offsets 2, 35 and 52).
_USUAL_LENGTH: Final = 55


def new_traceparent() -> bytes:
    """A fresh trace: random trace and span ids, sampled."""
    return b"00-%032x-%016x-01" % (_getrandbits(128), _getrandbits(64))


def is_traceparent(value: bytes | None) -> bool:
    """Whether ``value`` has the shape of a ``traceparent`` this module continues: four
    dash-separated fields, a 32-character trace id and a 16-character span id."""
    if value is None:
        return False
    if (
        len(value) == _USUAL_LENGTH
        and value[2] == value[35] == value[52] == 0x2D  # "-"
        and value.count(b"-") == 3
    ):
        return True  # the usual form, without splitting it
    parts = value.split(b"-")
    return len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16


def child_traceparent(parent: bytes | None) -> bytes:
    """Same trace as ``parent``, new span id; a fresh trace when ``parent`` is malformed."""
    if parent is not None and is_traceparent(parent):
        parts = parent.split(b"-")
        return b"%s-%s-%016x-%s" % (parts[0], parts[1], _getrandbits(64), parts[3])
    return new_traceparent()


def propagated_traceparent(parent: bytes | None) -> bytes:
    """What a hop that records no span of its own puts on its output: ``parent`` itself
    (its span stays the parent of whatever the next hop records), or a fresh trace when
    ``parent`` is missing or malformed. Nothing is drawn at random for a well-formed parent,
    which is why stage outputs use it (a tracer that records the hop's span rewrites the
    header to name that span, see :mod:`stages.tracing`)."""
    if parent is not None and is_traceparent(parent):
        return parent
    return new_traceparent()

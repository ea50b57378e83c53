"""Files as backfill sources: one request per convertible row, one reject per other row."""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np

from backfill.checkpoint import SourceState
from backfill.convert import Chunk, Reject
from backfill.engine import Item
from backfill.ids import file_key, request_id
from backfill.mapping import Mapping
from backfill.readers import FileReader
from schemas import RequestV1, Tensor
from schemas.messages import DType

_EDGE_BYTES = 1 << 20


def fingerprint(path: Path) -> str:
    """Size plus hashes of the first and last MiB: cheap, and catches an appended, truncated
    or rewritten file between a run and its ``--resume``."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as data:
        digest.update(data.read(_EDGE_BYTES))
        if size > _EDGE_BYTES:
            data.seek(max(size - _EDGE_BYTES, _EDGE_BYTES))
            digest.update(data.read(_EDGE_BYTES))
    return f"{size}:{digest.hexdigest()[:24]}"


def new_file_state(reader: FileReader) -> SourceState:
    path = reader.path.resolve()
    return SourceState(
        name=str(path),
        kind="file",
        key=file_key(path),
        format=reader.format,
        fingerprint=fingerprint(path),
        estimated_rows=reader.estimate_rows(),
    )


class FileSource:
    """Rows of one file as requests for ``model`` (``version``: None = the default)."""

    def __init__(
        self,
        *,
        reader: FileReader,
        mapping: Mapping,
        state: SourceState,
        backfill_id: str,
        model: str,
        version: str | None,
    ) -> None:
        self.state = state
        self._reader = reader
        self._mapping = mapping
        self._backfill_id = backfill_id
        self._model = model
        self._version = version

    def items(self, *, after_row: int) -> Iterator[Item]:
        for chunk in self._reader.chunks(self._mapping, after_row=after_row):
            yield from self._chunk_items(chunk)

    def _chunk_items(self, chunk: Chunk) -> Iterator[Item]:
        """Requests and rejects merged in row order."""
        requests = self._requests(chunk)
        rejects = ((r.row, r) for r in chunk.rejects)
        yield from heapq.merge(requests, rejects, key=lambda item: item[0])

    def _requests(self, chunk: Chunk) -> Iterator[tuple[int, RequestV1 | Reject | None]]:
        # Little-endian C-order buffers once per chunk; each row is then a bytes slice.
        columns = []
        for mapped in self._mapping:
            array = chunk.inputs[mapped.spec.name]
            array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
            dtype = cast(DType, mapped.spec.dtype)  # model.yaml declares wire dtypes
            columns.append((mapped.spec.name, dtype, list(mapped.spec.shape), array))
        for position, row in enumerate(chunk.rows.tolist()):
            inputs = {
                name: Tensor(dtype=dtype, shape=shape, data=array[position].tobytes())
                for name, dtype, shape, array in columns
            }
            yield row, self._request(row, inputs)

    def _request(self, row: int, inputs: dict[str, Tensor]) -> RequestV1:
        return RequestV1(
            id=request_id(self._backfill_id, self.state.key, row),
            model=self._model,
            model_version=self._version,
            inputs=inputs,
            created_at=time.time(),
            attributes={
                "source": "backfill",
                "backfill_id": self._backfill_id,
                "file": self.state.name,
                "row": str(row),
            },
        )

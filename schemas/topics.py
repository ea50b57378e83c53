"""Topic names. A prefix isolates one deployment (or one test) from another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    """The pipeline's topics, all sharing ``prefix`` (empty in production)."""

    prefix: str = ""

    @property
    def requests(self) -> str:
        return f"{self.prefix}inference.requests"

    @property
    def requests_backfill(self) -> str:
        return f"{self.prefix}inference.requests.backfill"

    @property
    def validated(self) -> str:
        return f"{self.prefix}inference.validated"

    @property
    def results(self) -> str:
        return f"{self.prefix}inference.results"

    @property
    def stored(self) -> str:
        return f"{self.prefix}inference.stored"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}inference.dlq"

    def all(self) -> list[str]:
        return [
            self.requests,
            self.requests_backfill,
            self.validated,
            self.results,
            self.stored,
            self.dlq,
        ]

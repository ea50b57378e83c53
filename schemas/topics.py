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

    @property
    def models(self) -> str:
        """The control plane: each model's desired state (compacted, key = model name)."""
        return f"{self.prefix}inference.models"

    @property
    def shadow(self) -> str:
        """A shadow version's results (same ids as the primary's); never stored in Redis."""
        return f"{self.prefix}inference.shadow"

    @property
    def stats(self) -> str:
        """Closed monitoring windows (``streaminfer monitor``; compacted, key =
        ``<model>/<version>/<window>``): the latest window of each size per model version."""
        return f"{self.prefix}inference.stats"

    def all(self) -> list[str]:
        return [
            self.requests,
            self.requests_backfill,
            self.validated,
            self.results,
            self.stored,
            self.dlq,
            self.models,
            self.shadow,
            self.stats,
        ]

    def compacted(self) -> list[str]:
        """Topics that keep the latest record per key (``cleanup.policy=compact``) and have
        one partition: the whole history of a key stays in order, and a reader catches up
        by reading one partition to its end."""
        return [self.models, self.stats]

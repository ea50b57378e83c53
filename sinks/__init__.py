"""Where results land outside Kafka."""

from sinks.redis_store import ResultStore

__all__ = ["ResultStore"]

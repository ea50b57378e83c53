"""``streaminfer ingest``: the HTTP API under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG


def serve(
    factory: str,
    *,
    host: str,
    port: int,
    workers: int,
    log_config: dict[str, Any] | None = None,
    loop: str = "auto",
) -> int:
    """Serve the app ``factory`` (an import string ``module:function`` returning the app)
    until SIGTERM/SIGINT; uvicorn drains open requests, then the app flushes Kafka.

    An import string, not an app: with ``workers`` > 1 each worker process imports it and
    builds its own app (and Kafka/Redis clients), and serves its own /metrics.

    ``loop``: uvicorn's event loop; ``asyncio`` when the gRPC door shares it (grpc.aio
    supports the standard asyncio loop, not uvloop)."""
    # proxy_headers off: the API listens directly by default, and it saves one middleware
    # layer per request (put a proxy in front and set FORWARDED_ALLOW_IPS if you need it).
    uvicorn.run(
        factory,
        factory=True,
        workers=workers,
        host=host,
        port=port,
        access_log=False,
        proxy_headers=False,
        loop=loop,
        log_config=LOGGING_CONFIG if log_config is None else log_config,
    )
    return 0

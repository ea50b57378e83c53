"""``streaminfer ingest``: the HTTP API under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

WORKER_HEALTHCHECK_S = 60


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
        # With workers, the parent kills a worker that does not answer its ping in time. A
        # spawned worker answers only once it has imported the CLI module (numpy, librdkafka,
        # FastAPI...): uvicorn's 5 s default killed every worker of a loaded 2-core machine
        # in a loop, before it ever served.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
    )
    return 0

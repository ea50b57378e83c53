"""``streaminfer ingest``: the HTTP API under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import uvicorn

from ingest.app import create_app
from streaminfer.settings import Settings


def serve(settings: Settings, *, host: str, port: int, workers: int) -> int:
    """Run until SIGTERM/SIGINT; uvicorn drains open requests, then the app flushes Kafka."""
    # proxy_headers off: the API listens directly by default, and it saves one middleware
    # layer per request (put a proxy in front and set FORWARDED_ALLOW_IPS if you need it).
    if workers == 1:
        uvicorn.run(
            create_app(settings), host=host, port=port, access_log=False, proxy_headers=False
        )
    else:
        # Each worker process builds its own app (and Kafka/Redis clients) from the
        # environment, and serves its own /metrics (see README "HTTP API").
        uvicorn.run(
            "ingest.app:create_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            access_log=False,
            proxy_headers=False,
        )
    return 0

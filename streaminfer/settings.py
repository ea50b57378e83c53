"""All configuration, read once at the edge from the environment (and an optional ``.env``).

Everything below this object takes keyword-only arguments; the only raw dict is the
librdkafka pass-through (``STREAMINFER_KAFKA_EXTRA``, JSON), merged last.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import Topics

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Settings; env vars are ``STREAMINFER_<FIELD>`` unless an alias is named."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMINFER_", env_file=".env", extra="ignore", frozen=True
    )

    kafka_bootstrap_servers: str = Field(
        # The local broker's port follows the ops script's setting.
        default_factory=lambda: f"127.0.0.1:{os.environ.get('STREAMINFER_KAFKA_PORT', '9092')}",
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "STREAMINFER_KAFKA_BOOTSTRAP_SERVERS"
        ),
    )
    kafka_extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="librdkafka properties merged into every client"
    )
    redis_url: SecretStr = Field(
        default_factory=lambda: SecretStr(
            f"redis://127.0.0.1:{os.environ.get('STREAMINFER_REDIS_PORT', '6379')}/0"
        ),
        validation_alias=AliasChoices("REDIS_URL", "STREAMINFER_REDIS_URL"),
    )

    topic_prefix: str = Field(default="", description="prefix of every topic and group id")
    topic_partitions: int = Field(default=4, ge=1)
    topic_replication_factor: int = Field(default=1, ge=1)

    models_dir: Path = REPO_ROOT / "models"
    home: Path = Field(default=REPO_ROOT / ".cache", description="local stack state (jars, data)")
    run_dir: Path = Field(default=REPO_ROOT / ".run", description="pid files and stage logs")

    processing_guarantee: Literal["exactly-once", "at-least-once"] = Field(
        default="exactly-once",
        description="exactly-once: Kafka transactions between stages; at-least-once: faster",
    )
    txn_max_records: int = Field(default=5000, ge=1, description="commit a transaction at")
    txn_max_interval_s: float = Field(default=0.02, ge=0, description="...or this old")
    txn_timeout_s: float = Field(
        default=10.0, gt=0, description="broker aborts a transaction left open this long"
    )
    worker_id: str = Field(
        default="",
        description="distinguishes the transactional.id of worker processes that share a "
        "group; 'hostname' uses the host name (one container per replica)",
    )
    kafka_consumer_extra: dict[str, str | int | float | bool] = Field(default_factory=dict)
    dlq_max_ratio: float = Field(default=0.5, gt=0, le=1, description="stop above this")
    dlq_window: int = Field(default=1000, ge=1, description="...of the last N records")
    dlq_min_records: int = Field(default=200, ge=1)
    priority_max_live_lag: int = Field(
        default=100, ge=0, description="validate pauses backfill while live lag exceeds this"
    )
    priority_max_downstream: int = Field(
        default=200,
        ge=0,
        description="while live requests flow, validate lets backfill in only while infer "
        "and persist together have fewer than this many records to do on top of live "
        "traffic's own share (0: no limit)",
    )
    priority_max_downstream_idle: int = Field(
        default=5000,
        ge=0,
        description="the same limit when no live request came for priority_live_idle_s",
    )
    priority_live_idle_s: float = Field(
        default=5.0, ge=0, description="live traffic counts as flowing this long after a request"
    )
    priority_poll_interval_s: float = Field(
        default=0.1, gt=0, description="how often validate reads the downstream lag"
    )
    batch_size: int = Field(default=500, ge=1, description="most records per batch")
    batch_timeout_s: float = Field(
        default=0.005,
        ge=0,
        description="once a record is there, how long to wait for more to fill a batch",
    )
    delivery_timeout_s: float = Field(default=30.0, gt=0)
    linger_ms: int = Field(default=5, ge=0)

    onnx_intra_op_threads: int = Field(default=1, ge=0)
    onnx_allow_spinning: bool = False

    result_ttl_s: int = Field(default=86_400, ge=1)
    metrics_port: int | None = Field(default=None, description="base port of /metrics per worker")

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    def group_id(self, stage: str) -> str:
        return f"{self.topic_prefix}streaminfer.{stage}"

    def transactional_id(self, stage: str, slot: int) -> str:
        """Stable per worker slot: a restarted worker fences its predecessor's transactions."""
        worker = socket.gethostname() if self.worker_id == "hostname" else self.worker_id
        return f"{self.group_id(stage)}.{worker + '.' if worker else ''}{slot}"

    # --- HTTP ingest (ingest/app.py, `streaminfer ingest`) ---
    ingest_host: str = Field(default="127.0.0.1", description="address the HTTP API listens on")
    ingest_port: int = Field(default=8000, ge=0, le=65535)
    ingest_workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    ingest_max_body_bytes: int = Field(default=1 << 20, ge=1, description="413 above this")
    ingest_max_batch: int = Field(default=1000, ge=1, description="413 above this many requests")
    ingest_delivery_timeout_s: float = Field(
        default=5.0, gt=0, description="wait this long for Kafka's acknowledgement, then 503"
    )
    ingest_linger_ms: int = Field(default=1, ge=0, description="producer linger of the API")
    ingest_queue_max_records: int = Field(
        default=100_000, ge=1, description="producer queue size; 429 when a body does not fit"
    )
    ingest_busy_retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 429")
    ingest_unavailable_retry_after_s: int = Field(default=5, ge=0, description="...of a 503")
    ingest_predict_timeout_s: float = Field(default=2.0, gt=0, description="predict default wait")
    ingest_predict_max_timeout_s: float = Field(default=30.0, gt=0)
    ingest_check_models: bool = Field(
        default=True,
        description="check each request against its model's signature before producing it "
        "(needs models_dir); off: only the message schema is checked, the validate stage "
        "dead-letters the rest",
    )
    ingest_probe_timeout_s: float = Field(default=2.0, gt=0, description="/readyz checks")
    api_keys: SecretStr | None = Field(
        default=None,
        description="comma-separated API keys; when set every route but /healthz and /readyz "
        "needs one (X-API-Key or Authorization: Bearer)",
    )
    api_public_docs: bool = Field(
        default=False, description="serve /docs and /openapi.json without a key"
    )

    def api_key_list(self) -> list[str]:
        """The configured API keys (empty: authentication is off)."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [key.strip() for key in raw.split(",") if key.strip()]

    # --- Backfills (backfill/, `streaminfer backfill|replay|export`) ---
    backfill_checkpoint_dir: Path | None = Field(
        default=None, description="checkpoints and reject reports (default <home>/backfills)"
    )
    backfill_checkpoint_interval_s: float = Field(
        default=1.0, gt=0, description="save a running backfill's checkpoint this often"
    )
    backfill_batch_rows: int = Field(default=4096, ge=1, description="rows per file read batch")

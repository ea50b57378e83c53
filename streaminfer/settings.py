"""All configuration, read once at the edge from the environment (and an optional ``.env``).

Settings come in groups (:class:`KafkaSettings`, :class:`StageSettings`,
:class:`PrioritySettings`, :class:`IngestSettings`, :class:`BackfillSettings`,
:class:`RedisSettings`); each group reads the variables with its own prefix
(``STREAMINFER_KAFKA_*``, ``STREAMINFER_STAGE_*``, ...). Names used before the groups existed
(``STREAMINFER_BATCH_SIZE``, ``KAFKA_BOOTSTRAP_SERVERS``, ...) keep working as aliases.
``streaminfer config --doc`` prints every variable from these classes; the README's table is
that output.

Everything below this object takes keyword-only arguments; the only raw dicts are the
librdkafka pass-throughs (``STREAMINFER_KAFKA_EXTRA``, ``STREAMINFER_KAFKA_CONSUMER_EXTRA``,
JSON), merged last.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import Topics
from schemas.keys import DEFAULT_TENANT, TENANT_NAME, is_tenant_name

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ".env"
Scalar = str | int | float | bool


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix, env_file=ENV_FILE, extra="ignore", frozen=True, populate_by_name=True
    )


def _env(*names: str) -> AliasChoices:
    """The variable names a field is read from, the current one first."""
    return AliasChoices(*names)


class KafkaSettings(BaseSettings):
    """Where Kafka is and how every client talks to it."""

    model_config = _config("STREAMINFER_KAFKA_")

    port: int = Field(
        default=9092, ge=1, le=65535, description="port of the local broker (ops/kafka)"
    )
    nodes: int = Field(
        default=1,
        ge=1,
        validation_alias=_env("KAFKA_NODES", "STREAMINFER_KAFKA_NODES"),
        description="local brokers `streaminfer up` starts: 1, or 3 for the three-broker "
        "cluster (ops/kafka/cluster.sh); with more than 1 the default bootstrap servers are "
        "the cluster's and the default replication factor is 3",
    )
    cluster_port: int = Field(
        default=19092,
        ge=1,
        le=65535,
        description="client port of node 1 of the local cluster (node N: + N - 1)",
    )
    bootstrap_servers: str = Field(
        default="",
        validation_alias=_env("KAFKA_BOOTSTRAP_SERVERS", "STREAMINFER_KAFKA_BOOTSTRAP_SERVERS"),
        description="brokers to use; when set, `streaminfer up` starts no local broker "
        "(default 127.0.0.1:<port>)",
    )
    extra: dict[str, Scalar] = Field(
        default_factory=dict, description="librdkafka properties merged into every client (JSON)"
    )
    consumer_extra: dict[str, Scalar] = Field(
        default_factory=dict, description="librdkafka properties merged into every consumer"
    )
    linger_ms: int = Field(
        default=5,
        ge=0,
        validation_alias=_env("STREAMINFER_KAFKA_LINGER_MS", "STREAMINFER_LINGER_MS"),
        description="producer linger of the stages and the backfill CLI",
    )
    delivery_timeout_s: float = Field(
        default=30.0,
        gt=0,
        validation_alias=_env(
            "STREAMINFER_KAFKA_DELIVERY_TIMEOUT_S", "STREAMINFER_DELIVERY_TIMEOUT_S"
        ),
        description="how long a producer tries to deliver a record",
    )
    message_max_bytes: int = Field(
        default=1_000_000,
        ge=1000,
        description="largest record a producer sends (librdkafka message.max.bytes); a stage "
        "dead-letters an output that would exceed it (too_large); ingest and backfill accept "
        "requests up to this less an ~18 KB margin for what the stages add",
    )
    topic_prefix: str = Field(
        default="",
        validation_alias=_env("STREAMINFER_KAFKA_TOPIC_PREFIX", "STREAMINFER_TOPIC_PREFIX"),
        description="prefix of every topic and group id",
    )
    topic_partitions: int = Field(
        default=4,
        ge=1,
        validation_alias=_env("STREAMINFER_KAFKA_TOPIC_PARTITIONS", "STREAMINFER_TOPIC_PARTITIONS"),
        description="partitions of the topics `streaminfer topics create` makes",
    )
    default_tenant: str = Field(
        default=DEFAULT_TENANT,
        pattern=f"^{TENANT_NAME.pattern}$",
        description="tenant of records without a streaminfer.tenant header (Kafka producers "
        "that bypass HTTP, backfills: trusted) and of API keys given without a tenant",
    )
    topic_replication_factor: int = Field(
        default=1,
        ge=1,
        validation_alias=_env(
            "STREAMINFER_KAFKA_TOPIC_REPLICATION_FACTOR", "STREAMINFER_TOPIC_REPLICATION_FACTOR"
        ),
        description="replication factor of those topics",
    )

    @model_validator(mode="after")
    def _local_broker(self) -> KafkaSettings:
        if not self.bootstrap_servers:
            ports = (
                [self.cluster_port + n for n in range(self.nodes)]
                if self.nodes > 1
                else [self.port]
            )
            servers = ",".join(f"127.0.0.1:{port}" for port in ports)
            object.__setattr__(self, "bootstrap_servers", servers)
        if self.nodes > 1 and "topic_replication_factor" not in self.model_fields_set:
            object.__setattr__(self, "topic_replication_factor", min(3, self.nodes))
        return self

    @property
    def external(self) -> bool:
        """True when the user named brokers of their own (environment or ``.env``)."""
        return "bootstrap_servers" in self.model_fields_set

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)


class StageSettings(BaseSettings):
    """How each stage worker consumes, batches, commits and runs models."""

    model_config = _config("STREAMINFER_STAGE_")

    processing_guarantee: Literal["exactly-once", "at-least-once"] = Field(
        default="exactly-once",
        validation_alias=_env(
            "STREAMINFER_STAGE_PROCESSING_GUARANTEE", "STREAMINFER_PROCESSING_GUARANTEE"
        ),
        description="exactly-once: Kafka transactions between stages; at-least-once: faster",
    )
    topology: Literal["split", "fused"] = Field(
        default="split",
        description="split: validate, infer and persist run as three groups, each scaled on "
        "its own; fused: one group (`stage fused`) runs all three on each batch, one "
        "transaction per commit (README: Topologies)",
    )
    batch_max_records: int = Field(
        default=500,
        ge=1,
        validation_alias=_env("STREAMINFER_STAGE_BATCH_MAX_RECORDS", "STREAMINFER_BATCH_SIZE"),
        description="most records per batch",
    )
    batch_timeout_s: float = Field(
        default=0.005,
        ge=0,
        validation_alias=_env("STREAMINFER_STAGE_BATCH_TIMEOUT_S", "STREAMINFER_BATCH_TIMEOUT_S"),
        description="once a record is there, how long to wait for more to fill a batch",
    )
    txn_max_records: int = Field(
        default=5000,
        ge=1,
        validation_alias=_env("STREAMINFER_STAGE_TXN_MAX_RECORDS", "STREAMINFER_TXN_MAX_RECORDS"),
        description="commit a transaction once it holds this many records",
    )
    txn_max_interval_s: float = Field(
        default=0.02,
        ge=0,
        validation_alias=_env(
            "STREAMINFER_STAGE_TXN_MAX_INTERVAL_S", "STREAMINFER_TXN_MAX_INTERVAL_S"
        ),
        description="...or once it is this old",
    )
    txn_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias=_env("STREAMINFER_STAGE_TXN_TIMEOUT_S", "STREAMINFER_TXN_TIMEOUT_S"),
        description="the broker aborts a transaction left open this long",
    )
    txn_commit_on_drain: bool = Field(
        default=True,
        description="...or as soon as a batch drains the input (the consumer returned fewer "
        "records than asked for): below saturation a record does not wait for the interval",
    )
    txn_retry_backoff_ms: int = Field(
        default=100,
        ge=1,
        description="retry.backoff.ms of the transactional producers: librdkafka waits this "
        "(doubling, up to retry.backoff.max.ms) before retrying AddOffsetsToTxn after a "
        "CONCURRENT_TRANSACTIONS answer",
    )
    txn_retry_backoff_max_ms: int = Field(
        default=1000,
        ge=1,
        description="...and at most this (retry.backoff.max.ms)",
    )
    rejoin_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="a worker that lost its partitions and has been assigned nothing for "
        "this long exits with 75 for a restart (librdkafka can stay stuck rejoining after a "
        "broker restart)",
    )
    commit_async: bool = Field(
        default=True,
        description="at-least-once: commit a batch's offsets without waiting for the answer, "
        "once its outputs are acknowledged (a synchronous commit on revoke and shutdown)",
    )
    worker_id: str = Field(
        default="",
        validation_alias=_env("STREAMINFER_STAGE_WORKER_ID", "STREAMINFER_WORKER_ID"),
        description="distinguishes the transactional.id of worker processes that share a "
        "group; 'hostname' uses the host name (one container per replica)",
    )
    dlq_max_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        validation_alias=_env("STREAMINFER_STAGE_DLQ_MAX_RATIO", "STREAMINFER_DLQ_MAX_RATIO"),
        description="a stage stops when more than this share of recent records fail for "
        "pipeline faults",
    )
    dlq_window_records: int = Field(
        default=1000,
        ge=1,
        validation_alias=_env("STREAMINFER_STAGE_DLQ_WINDOW_RECORDS", "STREAMINFER_DLQ_WINDOW"),
        description="...of the last this many records",
    )
    dlq_min_records: int = Field(
        default=200,
        ge=1,
        validation_alias=_env("STREAMINFER_STAGE_DLQ_MIN_RECORDS", "STREAMINFER_DLQ_MIN_RECORDS"),
        description="...once at least this many were seen",
    )
    models_dir: Path = Field(
        default=REPO_ROOT / "models",
        validation_alias=_env(
            "STREAMINFER_STAGE_MODELS_DIR", "STREAMINFER_MODEL_REPOSITORY", "STREAMINFER_MODELS_DIR"
        ),
        description="the model repository (models/<name>/model.yaml, <name>/<version>/); "
        "may be a directory outside the checkout",
    )
    onnx_intra_op_threads: int = Field(
        default=1,
        ge=0,
        validation_alias=_env(
            "STREAMINFER_STAGE_ONNX_INTRA_OP_THREADS", "STREAMINFER_ONNX_INTRA_OP_THREADS"
        ),
        description="ONNX Runtime threads per session (0: one per core)",
    )
    onnx_allow_spinning: bool = Field(
        default=False,
        validation_alias=_env(
            "STREAMINFER_STAGE_ONNX_ALLOW_SPINNING", "STREAMINFER_ONNX_ALLOW_SPINNING"
        ),
        description="let ONNX Runtime threads spin while idle (faster alone, worse shared)",
    )
    metrics_port: int | None = Field(
        default=None,
        validation_alias=_env("STREAMINFER_STAGE_METRICS_PORT", "STREAMINFER_METRICS_PORT"),
        description="base port of /metrics per worker (worker slot N serves port + N)",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the workers' /metrics listen on (0.0.0.0 in a container, so "
        "the kubelet's probes and Prometheus reach it)",
    )
    static_membership: bool = Field(
        default=True,
        description="group.instance.id per worker slot: a restarted worker takes its "
        "partitions back without a rebalance; a worker stopped for good keeps them unassigned "
        "until session.timeout.ms (45 s by default)",
    )
    restart_backoff_s: float = Field(
        default=1.0,
        gt=0,
        description="`stage --workers N`: wait before restarting a worker that exited; "
        "doubles on each quick exit",
    )
    restart_backoff_max_s: float = Field(default=30.0, gt=0, description="...up to this long")
    restart_reset_s: float = Field(
        default=60.0,
        gt=0,
        description="an exit sooner than this after the worker started is a quick exit",
    )
    crash_loop_limit: int = Field(
        default=5,
        ge=1,
        description="this many quick exits in a row of one worker stop the stage (exit 1)",
    )


class PrioritySettings(BaseSettings):
    """validate's live-first gate (``stages/priority.py``)."""

    model_config = _config("STREAMINFER_PRIORITY_")

    max_live_lag: int = Field(
        default=100, ge=0, description="validate pauses backfill while live lag exceeds this"
    )
    max_downstream: int = Field(
        default=200,
        ge=0,
        description="while live requests flow, validate lets backfill in only while infer "
        "and persist together have fewer than this many records to do on top of live "
        "traffic's own share (0: no limit)",
    )
    max_downstream_idle: int = Field(
        default=5000,
        ge=0,
        description="the same limit when no live request came for live_idle_s",
    )
    live_idle_s: float = Field(
        default=5.0, ge=0, description="live traffic counts as flowing this long after a request"
    )
    poll_interval_s: float = Field(
        default=0.1, gt=0, description="how often validate reads the downstream lag"
    )


class IngestSettings(BaseSettings):
    """The HTTP API (``streaminfer ingest``)."""

    model_config = _config("STREAMINFER_INGEST_")

    host: str = Field(default="127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(default=8000, ge=0, le=65535, description="port the HTTP API listens on")
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol gRPC door (`ingest --grpc-port`), "
        "on the same host as the HTTP API; unset: HTTP only",
    )
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    max_body_bytes: int = Field(default=1 << 20, ge=1, description="413 above this")
    max_batch_records: int = Field(
        default=1000,
        ge=1,
        validation_alias=_env(
            "STREAMINFER_INGEST_MAX_BATCH_RECORDS", "STREAMINFER_INGEST_MAX_BATCH"
        ),
        description="413 above this many requests in one body",
    )
    delivery_timeout_s: float = Field(
        default=5.0, gt=0, description="wait this long for Kafka's acknowledgement, then 503"
    )
    linger_ms: int = Field(default=1, ge=0, description="producer linger of the API")
    queue_max_records: int = Field(
        default=100_000, ge=1, description="producer queue size; 429 when a body does not fit"
    )
    busy_retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 429")
    unavailable_retry_after_s: int = Field(default=5, ge=0, description="Retry-After of a 503")
    predict_timeout_s: float = Field(
        default=2.0, gt=0, description="how long /v1/predict waits by default"
    )
    predict_max_timeout_s: float = Field(
        default=30.0, gt=0, description="the most a client may ask /v1/predict to wait"
    )
    check_models: bool = Field(
        default=True,
        description="check each request against its model's signature before producing it; "
        "off: only the message schema is checked, the validate stage dead-letters the rest",
    )
    probe_timeout_s: float = Field(default=2.0, gt=0, description="/readyz checks time out")
    metrics_dir: Path | None = Field(
        default=None,
        validation_alias=_env("PROMETHEUS_MULTIPROC_DIR"),
        description="prometheus-client's multiprocess directory: `ingest --workers N` sets it "
        "for its workers (a fresh one under run_dir) so that /metrics adds up all of them",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        validation_alias=_env("STREAMINFER_INGEST_API_KEYS", "STREAMINFER_API_KEYS"),
        description="comma-separated `tenant=key` pairs (a bare `key` belongs to "
        "kafka.default_tenant); when set every route but /healthz and /readyz needs a key "
        "(X-API-Key or Authorization: Bearer) and sees only its tenant's results",
    )
    public_docs: bool = Field(
        default=False,
        validation_alias=_env("STREAMINFER_INGEST_PUBLIC_DOCS", "STREAMINFER_API_PUBLIC_DOCS"),
        description="serve /docs and /openapi.json without a key",
    )

    def api_key_tenants(self, default_tenant: str) -> dict[str, str]:
        """Each configured API key and its tenant (empty: authentication is off).

        An entry is ``tenant=key`` when the part before the first ``=`` is a tenant name and
        the rest is a key not starting with ``=``; otherwise the whole entry is a bare key of
        ``default_tenant`` (so base64 keys ending in ``=`` padding stay bare keys)."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        tenants: dict[str, str] = {}
        for entry in filter(None, (part.strip() for part in raw.split(","))):
            name, _, key = entry.partition("=")
            if not (is_tenant_name(name) and key and not key.startswith("=")):
                name, key = default_tenant, entry
            if tenants.setdefault(key, name) != name:
                raise ValueError("STREAMINFER_INGEST_API_KEYS gives one key to two tenants")
        return tenants


class BackfillSettings(BaseSettings):
    """``streaminfer backfill | replay | export``."""

    model_config = _config("STREAMINFER_BACKFILL_")

    checkpoint_dir: Path | None = Field(
        default=None, description="checkpoints and reject reports (default <home>/backfills)"
    )
    checkpoint_interval_s: float = Field(
        default=1.0, gt=0, description="save a running backfill's checkpoint this often"
    )
    batch_rows: int = Field(default=4096, ge=1, description="rows per file read batch")
    max_row_bytes: int = Field(
        default=1 << 20,  # backfill.convert.MAX_CELL_BYTES (not imported: numpy, pyarrow)
        ge=1024,
        description="a CSV record, JSON line or Parquet value longer than this is a "
        "too_large reject",
    )


class RedisSettings(BaseSettings):
    """The result store."""

    model_config = _config("STREAMINFER_REDIS_")

    port: int = Field(
        default=6379, ge=1, le=65535, description="port of the local Redis (ops/redis)"
    )
    url: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=_env("REDIS_URL", "STREAMINFER_REDIS_URL"),
        description="Redis to use; when set, `streaminfer up` starts no local Redis "
        "(default redis://127.0.0.1:<port>/0)",
    )
    result_ttl_s: int = Field(
        default=86_400,
        ge=1,
        validation_alias=_env("STREAMINFER_REDIS_RESULT_TTL_S", "STREAMINFER_RESULT_TTL_S"),
        description="how long a result stays in Redis",
    )

    @model_validator(mode="after")
    def _local_redis(self) -> RedisSettings:
        if not self.url.get_secret_value():
            object.__setattr__(self, "url", SecretStr(f"redis://127.0.0.1:{self.port}/0"))
        return self

    @property
    def external(self) -> bool:
        """True when the user named a Redis of their own (environment or ``.env``)."""
        return "url" in self.model_fields_set


class TracingSettings(BaseSettings):
    """OpenTelemetry traces (streaminfer/tracing.py): the standard ``OTEL_*`` variables that
    decide whether and where to export. The SDK reads the others itself (``OTEL_TRACES_SAMPLER``,
    ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_RESOURCE_ATTRIBUTES``, ...)."""

    model_config = _config("OTEL_")

    sdk_disabled: bool = Field(default=False, description="`true`: no traces, whatever is set")
    traces_exporter: str = Field(
        default="",
        description="`otlp`, `console` or `none` (comma-separated); traces are on when this "
        "names an exporter or an OTLP endpoint is set",
    )
    exporter_otlp_endpoint: str = Field(
        default="", description="OTLP base URL, e.g. http://127.0.0.1:4318 (HTTP: + /v1/traces)"
    )
    exporter_otlp_traces_endpoint: str = Field(
        default="", description="OTLP traces URL, used as is (overrides the base URL)"
    )
    exporter_otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        default="http/protobuf",
        description="`grpc` needs opentelemetry-exporter-otlp-proto-grpc installed",
    )
    service_name: str = Field(
        default="", description="every span's service.name (default streaminfer-<stage|ingest>)"
    )


GROUPS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "stage": StageSettings,
    "priority": PrioritySettings,
    "ingest": IngestSettings,
    "backfill": BackfillSettings,
    "redis": RedisSettings,
    "tracing": TracingSettings,
}


class Settings(BaseSettings):
    """Every setting, by group; see the module docstring."""

    model_config = _config("STREAMINFER_")

    home: Path = Field(default=REPO_ROOT / ".cache", description="local stack state (jars, data)")
    run_dir: Path = Field(default=REPO_ROOT / ".run", description="pid files and stage logs")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per log line (time, level, logger, message, "
        "stage, worker, trace_id)",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    stage: StageSettings = Field(default_factory=StageSettings)
    priority: PrioritySettings = Field(default_factory=PrioritySettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    backfill: BackfillSettings = Field(default_factory=BackfillSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    @property
    def topics(self) -> Topics:
        return self.kafka.topics

    def group_id(self, stage: str) -> str:
        return f"{self.kafka.topic_prefix}streaminfer.{stage}"

    def transactional_id(self, stage: str, slot: int) -> str:
        """Stable per worker slot: a restarted worker fences its predecessor's transactions."""
        worker_id = self.stage.worker_id
        worker = socket.gethostname() if worker_id == "hostname" else worker_id
        return f"{self.group_id(stage)}.{worker + '.' if worker else ''}{slot}"

    def with_changes(self, **groups: dict[str, Any]) -> Settings:
        """A copy with some fields of some groups replaced, e.g.
        ``with_changes(kafka={"topic_prefix": "t."})``; values are validated."""
        update: dict[str, Any] = {}
        for group, fields in groups.items():
            current: BaseSettings = getattr(self, group)
            update[group] = type(current).model_validate(
                {**current.model_dump(exclude_unset=True), **fields}
            )
        return self.model_copy(update=update)

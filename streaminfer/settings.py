"""All configuration, read once at the edge from the environment (and an optional ``.env``).

Everything below this object takes keyword-only arguments; the only raw dict is the
librdkafka pass-through (``STREAMINFER_KAFKA_EXTRA``, JSON), merged last.
"""

from __future__ import annotations

import os
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

    processing_guarantee: Literal["at-least-once"] = "at-least-once"
    batch_size: int = Field(default=500, ge=1, description="records per consume() call")
    batch_timeout_s: float = Field(default=0.05, gt=0, description="max wait to fill a batch")
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

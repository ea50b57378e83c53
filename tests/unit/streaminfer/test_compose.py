"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

import pytest
import yaml

from streaminfer.cli import build_parser
from tests.helpers import REPO


def _services() -> dict[str, dict[str, object]]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_compose_has_the_whole_stack() -> None:
    assert {"kafka", "redis", "topics", "validate", "infer", "persist", "ingest"} <= set(
        _services()
    )


@pytest.mark.parametrize("name", ["topics", "validate", "infer", "persist", "ingest"])
def test_every_streaminfer_command_exists_in_the_cli(name: str) -> None:
    service = _services()[name]
    command = service["command"]
    assert isinstance(command, list)
    build_parser().parse_args(command)  # SystemExit (a failure) when the CLI lacks it


def test_stage_services_have_a_replica_count() -> None:
    for name in ("validate", "infer", "persist"):
        deploy = _services()[name]["deploy"]
        assert isinstance(deploy, dict) and deploy["replicas"] >= 1


def test_kafka_is_kraft_with_replication_factor_one() -> None:
    env = _services()["kafka"]["environment"]
    assert isinstance(env, dict)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == 0


def test_redis_memory_is_bounded_and_evicts_by_ttl() -> None:
    # compose's Redis and the local one (ops/redis/redis.sh renders redis.conf on each start)
    command = _services()["redis"]["command"]
    assert isinstance(command, list)
    assert command[command.index("--maxmemory") + 1] == "${STREAMINFER_REDIS_MAXMEMORY:-1gb}"
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-ttl"
    script = (REPO / "ops" / "redis" / "redis.sh").read_text()
    assert 'maxmemory="${STREAMINFER_REDIS_MAXMEMORY:-1gb}"' in script
    assert "maxmemory $maxmemory\nmaxmemory-policy volatile-ttl\n" in script


def test_the_image_installs_the_locked_product_dependencies_only() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert "pip install --no-cache-dir --no-deps /src" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"bench", "tests", ".venv", ".cache"} <= set(ignored)

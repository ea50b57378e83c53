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

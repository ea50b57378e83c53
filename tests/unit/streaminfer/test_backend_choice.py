"""Where the tests' Kafka and Redis come from: external, testcontainers or the local launcher."""

from __future__ import annotations

import pytest

from tests.fixtures import choose_backend, docker_answers, kafka_environment

KAFKA = "KAFKA_BOOTSTRAP_SERVERS"
REDIS = "REDIS_URL"


def never_asked() -> bool:
    raise AssertionError("Docker was asked although the choice was already made")


@pytest.mark.parametrize(
    ("environ", "variable", "answers", "backend"),
    [
        ({}, KAFKA, False, "local"),
        ({}, KAFKA, True, "testcontainers"),
        ({}, REDIS, True, "testcontainers"),
        ({KAFKA: "broker:9092"}, KAFKA, True, "external"),
        ({REDIS: "redis://r:6379/0"}, REDIS, True, "external"),
        # Each service on its own: an external Kafka does not make Redis external.
        ({KAFKA: "broker:9092"}, REDIS, False, "local"),
        ({KAFKA: "broker:9092"}, REDIS, True, "testcontainers"),
    ],
)
def test_the_choice_follows_the_environment_then_docker(
    environ: dict[str, str], variable: str, answers: bool, backend: str
) -> None:
    assert choose_backend(environ, variable, lambda: answers) == backend


@pytest.mark.parametrize(
    ("environ", "variable", "backend"),
    [
        ({"STREAMINFER_TEST_BACKEND": "local", KAFKA: "broker:9092"}, KAFKA, "local"),
        ({"STREAMINFER_TEST_BACKEND": "testcontainers", KAFKA: "b:1"}, KAFKA, "testcontainers"),
        ({"STREAMINFER_TEST_BACKEND": " Local "}, REDIS, "local"),
        ({"STREAMINFER_TEST_BACKEND": "external", REDIS: "redis://r/0"}, REDIS, "external"),
    ],
)
def test_streaminfer_test_backend_overrides_without_asking_docker(
    environ: dict[str, str], variable: str, backend: str
) -> None:
    assert choose_backend(environ, variable, never_asked) == backend


def test_an_explicit_variable_is_used_without_asking_docker() -> None:
    assert choose_backend({KAFKA: "b:9092"}, KAFKA, never_asked) == "external"


@pytest.mark.parametrize(
    "environ",
    [
        {"STREAMINFER_TEST_BACKEND": "docker"},
        {"STREAMINFER_TEST_BACKEND": "external"},  # external, but nothing to point at
    ],
)
def test_a_backend_that_cannot_be_honoured_stops_the_session(environ: dict[str, str]) -> None:
    with pytest.raises(pytest.UsageError, match="STREAMINFER_TEST_BACKEND"):
        choose_backend(environ, KAFKA, never_asked)


def test_no_docker_engine_here_answers_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")  # nothing listens on port 1
    docker_answers.cache_clear()
    try:
        assert docker_answers(timeout_s=1.0) is False
    finally:
        docker_answers.cache_clear()


def test_the_kafka_container_advertises_the_host_port_it_is_bound_to() -> None:
    env = kafka_environment(39092)
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://127.0.0.1:39092"
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    assert listeners["PLAINTEXT"] == ":9092"  # the container port the fixture binds
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"  # one node: EOS works

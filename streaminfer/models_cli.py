"""``streaminfer models ...``: the model repository and the control plane.

Repository (no Kafka): ``list``, ``describe NAME`` (also shows the control state when Kafka
answers), ``validate PATH``. Control plane (each command reads ``inference.models`` to its
end, applies one change to the model's current state and writes the new state):
``load``, ``unload``, ``route``, ``promote``, ``rollback``, ``shadow``, ``set``, ``reset``.
``compare NAME --shadow V`` reads ``inference.shadow`` and ``inference.results``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from kafkaio.offsets import end_offsets, offsets_at
from schemas import Codec, DecodeError, ResultV1
from schemas.control import (
    InvalidChange,
    ModelSettings,
    ModelState,
    configure,
    default_state,
    load,
    promote,
    rollback,
    route,
    shadow,
    unload,
)
from schemas.models import ModelCatalog, ModelSpec, UnknownModel, load_spec, version_order
from stages.control import publish_state, read_states
from streaminfer.kafka import make_consumer, make_producer
from streaminfer.settings import Settings

Change = Callable[[ModelState, ModelSpec, float, str], ModelState]
_READ_TIMEOUT_S = 120.0  # compare: the most time spent reading one topic

# ONNX Runtime's type names -> the numpy names model.yaml uses.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def add_parsers(models_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``models`` actions (``streaminfer models ACTION``)."""
    models_sub.add_parser("list", help="models, versions and input signatures")
    describe = models_sub.add_parser("describe", help="a model's contract and control state")
    describe.add_argument("name")
    validate = models_sub.add_parser(
        "validate", help="check a version folder's ONNX file against its model.yaml, run it once"
    )
    validate.add_argument("path", type=Path, help="e.g. models/digits/2")
    for action, what in (("load", "keep VERSION loaded"), ("unload", "release VERSION")):
        parser = models_sub.add_parser(action, help=what)
        parser.add_argument("name")
        parser.add_argument("version")
    routing = models_sub.add_parser("route", help="split traffic: route digits 1=95 2=5")
    routing.add_argument("name")
    routing.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    promote_p = models_sub.add_parser("promote", help="all traffic to VERSION")
    promote_p.add_argument("name")
    promote_p.add_argument("version")
    rollback_p = models_sub.add_parser("rollback", help="back to the previous routing")
    rollback_p.add_argument("name")
    shadow_p = models_sub.add_parser("shadow", help="mirror every batch to VERSION (or --off)")
    shadow_p.add_argument("name")
    shadow_p.add_argument("version", nargs="?")
    shadow_p.add_argument("--off", action="store_true")
    _add_set_parser(models_sub)
    reset = models_sub.add_parser("reset", help="forget the control state: repository defaults")
    reset.add_argument("name")
    compare = models_sub.add_parser("compare", help="agreement of a shadow with the primary")
    compare.add_argument("name")
    compare.add_argument("--shadow", required=True, metavar="VERSION")
    compare.add_argument("--window", type=float, default=3600.0, help="seconds back (3600)")


def _add_set_parser(models_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    settings = models_sub.add_parser("set", help="per-model batching and threads")
    settings.add_argument("name")
    settings.add_argument("--max-batch-size", type=int, default=None)
    settings.add_argument("--max-queue-delay-ms", type=float, default=None)
    settings.add_argument(
        "--preferred-batch-sizes", default=None, metavar="N,N,...", help="e.g. 8,32,128"
    )
    settings.add_argument("--intra-op-threads", type=int, default=None)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Dispatch ``streaminfer models ACTION``; returns the exit code."""
    action = args.models_command
    try:
        if action in _REPOSITORY:
            return _REPOSITORY[action](settings, args)
        if action == "compare":
            return compare(settings, args.name, args.shadow, window_s=args.window)
        if action == "reset":
            return _reset(settings, args.name)
        return change(settings, args.name, _change_of(args))
    except (InvalidChange, UnknownModel, ValueError) as exc:
        print(f"streaminfer models {action}: {exc}", file=sys.stderr)
        return 2


def _change_of(args: argparse.Namespace) -> Change:
    action = args.models_command
    if action == "load":
        return lambda s, spec, now, who: load(s, spec, args.version, now=now, who=who)
    if action == "unload":
        return lambda s, _spec, now, who: unload(s, args.version, now=now, who=who)
    if action == "route":
        weights = parse_weights(args.weights)
        return lambda s, spec, now, who: route(s, spec, weights, now=now, who=who)
    if action == "promote":
        return lambda s, spec, now, who: promote(s, spec, args.version, now=now, who=who)
    if action == "rollback":
        return lambda s, _spec, now, who: rollback(s, now=now, who=who)
    if action == "shadow":
        if args.off == (args.version is not None):
            raise ValueError("give a VERSION or --off")
        version = None if args.off else args.version
        return lambda s, spec, now, who: shadow(s, spec, version, now=now, who=who)
    chosen = _settings_of(args)
    return lambda s, _spec, now, who: configure(s, chosen, now=now, who=who)


def parse_weights(items: list[str]) -> dict[str, int]:
    """``["1=95", "2=5"]`` -> ``{"1": 95, "2": 5}``."""
    weights: dict[str, int] = {}
    for item in items:
        version, sep, weight = item.partition("=")
        if not sep or not version or not weight.isdigit():
            raise ValueError(f"{item!r}: write VERSION=WEIGHT, e.g. 2=5")
        weights[version] = int(weight)
    return weights


def _settings_of(args: argparse.Namespace) -> ModelSettings:
    preferred = None
    if args.preferred_batch_sizes:
        preferred = [int(n) for n in args.preferred_batch_sizes.split(",")]
    chosen = ModelSettings(
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        preferred_batch_sizes=preferred,
        intra_op_threads=args.intra_op_threads,
    )
    if chosen == ModelSettings():
        raise ValueError("set nothing: give at least one --option")
    return chosen


def _consumer(settings: Settings) -> Consumer:
    group = f"{settings.kafka.topic_prefix}streaminfer.models-cli.{uuid.uuid4().hex[:12]}"
    return make_consumer(settings, group_id=group)


def _producer(settings: Settings) -> Producer:
    """acks=all, without idempotence: a command writes one record, so a retry can at worst
    write the same state twice (harmless), and the idempotent producer's start-up (about
    0.5 s to get a producer id) would delay every switch by that much."""
    return make_producer(settings, **{"enable.idempotence": False, "linger.ms": 0})


def current_states(settings: Settings) -> dict[str, ModelState]:
    consumer = _consumer(settings)
    try:
        return read_states(consumer, settings.topics.models)
    finally:
        consumer.close()


def change(settings: Settings, name: str, apply: Change) -> int:
    """Read ``name``'s current state, apply one change, write the new state."""
    spec = ModelCatalog(settings.stage.models_dir).spec(name)
    current = current_states(settings).get(name) or default_state(spec)
    new = apply(current, spec, time.time(), f"cli@{socket.gethostname()}")
    publish_state(_producer(settings), settings.topics.models, new)
    print(f"{name}: revision {new.revision} written")
    print("\n".join(state_lines(new)))
    return 0


def _reset(settings: Settings, name: str) -> int:
    """A tombstone: the model goes back to its repository policy and default routing."""
    spec = ModelCatalog(settings.stage.models_dir).spec(name)
    producer = _producer(settings)
    producer.produce(settings.topics.models, key=name.encode(), value=None)
    if producer.flush(30) != 0:
        print(f"{name}: the reset was not acknowledged", file=sys.stderr)
        return 1
    print(f"{name}: back to the repository's defaults")
    print("\n".join(state_lines(default_state(spec))))
    return 0


def state_lines(state: ModelState) -> list[str]:
    routing = " ".join(f"{v}={w}" for v, w in state.routed().items())
    previous = " ".join(f"{v}={w}" for v, w in (state.previous_routing or {}).items())
    lines = [
        f"  loaded    {', '.join(state.versions())}",
        f"  routing   {routing}" + (f"   (rollback to: {previous})" if previous else ""),
        f"  shadow    {state.shadow or '-'}",
    ]
    chosen = {f: getattr(state.settings, f) for f in ModelSettings.__struct_fields__}
    set_fields = ", ".join(f"{k}={v}" for k, v in chosen.items() if v is not None)
    lines.append(f"  settings  {set_fields or 'from model.yaml'}")
    if state.revision:
        when = datetime.fromtimestamp(state.updated_at, UTC).isoformat(timespec="seconds")
        lines.append(f"  revision  {state.revision} at {when} by {state.changed_by or '?'}")
    else:
        lines.append("  revision  0 (no command yet: the repository's policy)")
    return lines


def _list(settings: Settings, _args: argparse.Namespace) -> int:
    catalog = ModelCatalog(settings.stage.models_dir)
    for name in catalog.names():
        spec = catalog.spec(name)
        inputs = ", ".join(f"{i.name}: {i.dtype}{list(i.shape)}" for i in spec.inputs)
        versions = ", ".join(sorted(spec.versions, key=version_order))
        print(
            f"{name}  versions [{versions}] default {spec.default_version}  "
            f"policy {spec.version_policy.describe()}  inputs {inputs}"
        )
    return 0


def _describe(settings: Settings, args: argparse.Namespace) -> int:
    spec = ModelCatalog(settings.stage.models_dir).spec(args.name)
    print(f"{spec.name}")
    for version in sorted(spec.versions, key=version_order):
        present = "ok" if spec.versions[version].is_file() else "MISSING"
        print(f"  version {version}: {spec.versions[version]} ({present})")
    print(f"  default   {spec.default_version}; policy {spec.version_policy.describe()}")
    for tensor in spec.inputs:
        bounds = f" [{tensor.min}, {tensor.max}]" if tensor.min is not None or tensor.max else ""
        print(f"  input     {tensor.name}: {tensor.dtype}{list(tensor.shape)}{bounds}")
    for tensor in spec.outputs:
        print(f"  output    {tensor.name}: {tensor.dtype}{list(tensor.shape)}")
    if spec.labels:
        print(f"  labels    {', '.join(spec.labels)} (from {spec.label_from})")
    print(
        f"  batching  max_batch_size {spec.max_batch_size}, max_queue_delay_ms "
        f"{spec.max_queue_delay_ms}, preferred {list(spec.preferred_batch_sizes)}"
    )
    try:
        state = current_states(settings).get(spec.name)
    except Exception as exc:  # the repository part is useful without Kafka
        print(f"control plane: unreadable ({exc})")
        return 0
    print("control plane:")
    print("\n".join(state_lines(state or default_state(spec))))
    return 0


def _validate(_settings: Settings, args: argparse.Namespace) -> int:
    problems = validate_version(args.path, echo=print)
    if problems:
        print(f"INVALID: {len(problems)} problem(s)")
        return 1
    print("OK: the version matches its model.yaml and runs")
    return 0


def validate_version(path: Path, *, echo: Callable[[str], None]) -> list[str]:
    """Problems of the version folder ``path`` (``<repo>/<model>/<version>``) against its
    model's ``model.yaml``: the ONNX signature (names, dtypes, dimensions after the dynamic
    batch dimension), then one run on a generated batch of two and the outputs' shapes."""
    import onnxruntime as ort  # only this command needs it

    from stages.models import example_feeds

    version_dir = path.parent if path.is_file() else path
    spec = load_spec(version_dir.parent)
    onnx = spec.versions.get(version_dir.name, version_dir / "model.onnx")
    if not onnx.is_file():
        return _report([f"no ONNX file at {onnx}"], echo)
    echo(f"{spec.name} version {version_dir.name}: {onnx}")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    problems = _signature(spec, session)
    if problems:
        return _report(problems, echo)
    echo("  signature matches model.yaml")
    names = [o.name for o in spec.outputs]
    try:
        outputs = session.run(names, example_feeds(spec, rows=2))
    except Exception as exc:
        return _report([f"a run on a generated example failed: {exc}"], echo)
    problems = list(_output_problems(spec, dict(zip(names, outputs, strict=True))))
    if not problems:
        echo(f"  one run on a generated batch of 2 succeeded: {_shapes(names, outputs)}")
    return _report(problems, echo)


def _report(problems: list[str], echo: Callable[[str], None]) -> list[str]:
    for problem in problems:
        echo(f"  problem: {problem}")
    return problems


def _signature(spec: ModelSpec, session: Any) -> list[str]:
    problems: list[str] = []
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = {o.name: o for o in session.get_outputs()}
    if set(graph_inputs) != {i.name for i in spec.inputs}:
        problems.append(
            f"inputs: model.yaml {[i.name for i in spec.inputs]}, ONNX {sorted(graph_inputs)}"
        )
    missing = [o.name for o in spec.outputs if o.name not in graph_outputs]
    if missing:
        problems.append(f"outputs {missing} of model.yaml are not in the ONNX graph")
    for declared in [*spec.inputs, *spec.outputs]:
        arg = graph_inputs.get(declared.name) or graph_outputs.get(declared.name)
        if arg is None:
            continue
        dtype = _ORT_DTYPES.get(arg.type, arg.type)
        if dtype != declared.dtype:
            problems.append(f"{declared.name}: model.yaml {declared.dtype}, ONNX {dtype}")
        fixed = [d if isinstance(d, int) else None for d in arg.shape[1:]]
        if len(fixed) != len(declared.shape) or any(
            d is not None and d != want for d, want in zip(fixed, declared.shape, strict=False)
        ):
            problems.append(
                f"{declared.name}: model.yaml shape [N, {list(declared.shape)}], ONNX {arg.shape}"
            )
    return problems


def _output_problems(spec: ModelSpec, outputs: dict[str, Any]) -> Iterator[str]:
    for declared in spec.outputs:
        value = np.asarray(outputs[declared.name])
        if value.shape != (2, *declared.shape):
            yield f"{declared.name}: shape {list(value.shape)}, want [2, *{list(declared.shape)}]"
    if spec.labels and spec.label_from:
        width = np.asarray(outputs[spec.label_from]).shape[-1]
        if width != len(spec.labels):
            yield f"{spec.label_from} has {width} columns for {len(spec.labels)} labels"


def _shapes(names: list[str], outputs: list[Any]) -> str:
    return ", ".join(
        f"{n} {list(np.asarray(o).shape)}" for n, o in zip(names, outputs, strict=True)
    )


def compare(settings: Settings, name: str, version: str, *, window_s: float) -> int:
    """Agreement of shadow ``version`` of ``name`` with the primary, over the last
    ``window_s`` seconds of ``inference.shadow`` (joined with ``inference.results`` by id)."""
    since_ms = int((time.time() - window_s) * 1000)
    shadows = {
        r.id: r
        for r in _read_results(settings, settings.topics.shadow, since_ms)
        if r.model == name and r.model_version == version
    }
    # The primary's result of a batch is written in the same transaction as its shadow's;
    # a minute of slack covers clock skew between the two records' timestamps.
    primaries = {
        r.id: r
        for r in _read_results(settings, settings.topics.results, since_ms - 60_000)
        if r.id in shadows
    }
    print("\n".join(agreement_lines(name, version, window_s, shadows, primaries)))
    return 0 if primaries else 1


def agreement_lines(
    name: str,
    version: str,
    window_s: float,
    shadows: dict[str, ResultV1],
    primaries: dict[str, ResultV1],
) -> list[str]:
    """The ``compare`` report: pairs, label match rate, mean absolute score difference."""
    pairs = [(primaries[i], shadows[i]) for i in shadows if i in primaries]
    lines = [f"compare {name}: shadow version {version}, last {window_s:.0f} s"]
    lines.append(f"  shadow results       {len(shadows)}")
    by_version = Counter(p.model_version for p, _ in pairs)
    primary = ", ".join(f"{v}: {n}" for v, n in sorted(by_version.items())) or "-"
    lines.append(f"  with a primary       {len(pairs)} (primary versions {primary})")
    if not pairs:
        return [*lines, "  nothing to compare"]
    same = sum(p.label == s.label for p, s in pairs)
    lines.append(f"  label agreement      {same / len(pairs):.2%} ({same}/{len(pairs)})")
    diffs = [d for p, s in pairs if (d := _score_difference(p, s)) is not None]
    if diffs:
        lines.append(f"  mean |score diff|    {float(np.mean(diffs)):.4f} (max {max(diffs):.4f})")
    return lines


def _score_difference(primary: ResultV1, shadow_result: ResultV1) -> float | None:
    """Mean absolute difference of the two results' scores (per label)."""
    if not primary.scores or not shadow_result.scores:
        return None
    labels = primary.scores.keys() & shadow_result.scores.keys()
    if not labels:
        return None
    return float(np.mean([abs(primary.scores[k] - shadow_result.scores[k]) for k in labels]))


def _read_results(settings: Settings, topic: str, since_ms: int) -> Iterator[ResultV1]:
    """Results of ``topic`` from ``since_ms`` (Kafka's time index) to the end now."""
    codec = Codec(ResultV1)
    consumer = _consumer(settings)
    try:
        starts = offsets_at(consumer, topic, max(since_ms, 0))
        ends = end_offsets(consumer, topic)
        todo = {p for p in starts if starts[p] < ends.get(p, 0)}
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
        deadline = time.monotonic() + _READ_TIMEOUT_S
        while todo and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=1.0):
                if message.error() is None:
                    with contextlib.suppress(DecodeError):  # not a result: not ours to judge
                        yield codec.decode(message.value() or b"")
            positions = consumer.position([TopicPartition(topic, p) for p in todo])
            todo = {tp.partition for tp in positions if tp.offset < ends[tp.partition]}
    finally:
        consumer.close()


_REPOSITORY: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "list": _list,
    "describe": _describe,
    "validate": _validate,
}

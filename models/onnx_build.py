"""What the model build scripts share (``build_digits.py``, ``build_breast_cancer.py``).

Not a product module: the scripts import it from their own folder (``python models/<script>``
puts ``models/`` first on ``sys.path``). It converts a fitted scikit-learn estimator to ONNX
the way the pipeline needs it (dynamic batch dimension, plain-tensor outputs, a fixed
opset), opens onnxruntime sessions configured like the infer stage, checks a model's real
signature against its ``model.yaml`` and writes reproducible files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import skl2onnx
import sklearn
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.model_selection import train_test_split

# Default domain / ai.onnx.ml opsets: well inside what skl2onnx is tested with and what
# every onnxruntime >= 1.18 (the project's floor) executes.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
MIN_AGREEMENT = 0.995
SEED = 42

MODELS_DIR = Path(__file__).resolve().parent

ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(int64)": "int64",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(string)": "string",
}


def to_onnx(estimator: Any, *, name: str, n_features: int, path: Path) -> None:
    """Convert a fitted classifier: input ``input`` float32 [N, n_features]; outputs
    ``label`` int64 [N] and ``probabilities`` float32 [N, classes] (no ZipMap)."""
    onx = convert_sklearn(
        estimator,
        name=name,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(estimator): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session configured like the pipeline's infer stage (1 thread, no spin)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_and_compare(
    path: Path, x: np.ndarray, sk_pred: np.ndarray, sk_proba: np.ndarray
) -> dict[str, np.ndarray]:
    """Run the ONNX model on ``x`` and assert it agrees with scikit-learn; its outputs."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {"input": x}), strict=True))
    label, proba = out["label"], out["probabilities"]
    assert label.dtype == np.int64 and label.shape == (len(x),), (label.dtype, label.shape)
    assert proba.dtype == np.float32 and proba.shape == sk_proba.shape, (proba.dtype, proba.shape)
    agreement = float(np.mean(label == sk_pred))
    assert agreement >= MIN_AGREEMENT, f"onnxruntime/scikit-learn agreement {agreement:.4f}"
    # model.yaml says the label is the argmax of "probabilities": make sure that holds.
    assert np.array_equal(np.argmax(proba, axis=1), label), "argmax(probabilities) != label"
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)
    print(
        f"  onnxruntime vs scikit-learn label agreement {agreement:.4f}, "
        f"max |dprob| {float(np.max(np.abs(proba - sk_proba))):.2e}"
    )
    return out


def label_distribution(y: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """The share of each label in ``y`` (class ids indexing ``labels``), 4 decimals."""
    counts = np.bincount(y, minlength=len(labels))
    return {label: round(float(c) / len(y), 4) for label, c in zip(labels, counts, strict=True)}


def flow_mapping(shares: dict[str, float]) -> str:
    """``{"0": 0.1, ...}`` as one YAML flow mapping with quoted keys (stable text)."""
    return "{" + ", ".join(f'"{k}": {v:.4f}' for k, v in shares.items()) + "}"


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so reruns are byte-identical."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    path.write_bytes(buf.getvalue())


def check_signature(sess: ort.InferenceSession, contract: dict[str, Any]) -> None:
    """Assert the model's real inputs/outputs are exactly those declared in model.yaml."""

    def actual(args: list[Any]) -> list[tuple[str, str, list[Any]]]:
        return [(a.name, ORT_DTYPES.get(a.type, a.type), list(a.shape)) for a in args]

    for kind, real in (
        ("inputs", actual(sess.get_inputs())),
        ("outputs", actual(sess.get_outputs())),
    ):
        declared = contract[kind]
        assert [d["name"] for d in declared] == [r[0] for r in real], (kind, declared, real)
        for d, (name, dtype, shape) in zip(declared, real, strict=True):
            assert d["dtype"] == dtype, (kind, name, d["dtype"], dtype)
            batch, rest = shape[0], shape[1:]
            assert not isinstance(batch, int), f"{kind} {name}: batch dim must be dynamic: {shape}"
            assert list(d["shape"]) == rest, (kind, name, d["shape"], rest)


def describe(sess: ort.InferenceSession) -> list[str]:
    def line(args: list[Any]) -> str:
        return ", ".join(f"{a.name} {ORT_DTYPES.get(a.type, a.type)} {list(a.shape)}" for a in args)

    return [f"  inputs:  {line(sess.get_inputs())}", f"  outputs: {line(sess.get_outputs())}"]


def report_files(*paths: Path) -> None:
    for p in paths:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        where = p.relative_to(MODELS_DIR.parent)
        print(f"  wrote {where}  {p.stat().st_size:,} bytes  sha256 {digest}")


def bench(sess: ort.InferenceSession, x: np.ndarray, batch_sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(SEED)
    print("onnxruntime CPU, intra_op_num_threads=1, allow_spinning=0 (median of repeats):")
    for n in batch_sizes:
        batch = x[rng.integers(0, len(x), size=n)].astype(np.float32)
        for _ in range(50):  # warm-up
            sess.run(None, {"input": batch})
        reps = max(200, 20_000 // n)
        times = np.empty(reps)
        for i in range(reps):
            t0 = time.perf_counter_ns()
            sess.run(None, {"input": batch})
            times[i] = time.perf_counter_ns() - t0
        med = float(np.median(times)) / 1e3
        print(
            f"  batch {n:4d}: {med:9.1f} us/call  {med / n:7.2f} us/row  "
            f"(p90 {float(np.percentile(times, 90)) / 1e3 / n:.2f} us/row, {reps} reps)"
        )


def parse_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """A build script's command line (``doc`` is its ``__doc__``): ``--bench``."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bench", action="store_true", help="also time onnxruntime at batch 1/64/512")
    return ap.parse_args(argv)


def split(x: np.ndarray, y: np.ndarray, *, test_size: float) -> list[np.ndarray]:
    """``x_train, x_test, y_train, y_test``: stratified, seeded, float32 features."""
    x = x.astype(np.float32)  # the pipeline feeds float32; train on exactly those values
    y = y.astype(np.int64)
    parts: list[np.ndarray] = train_test_split(
        x, y, test_size=test_size, random_state=SEED, stratify=y
    )
    return parts


def toolchain(train_rows: int, test_rows: int) -> str:
    """The versions a build used and its row counts, for the build's first line."""
    return (
        f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, "
        f"onnxruntime {ort.__version__}, opset {TARGET_OPSET}; "
        f"train {train_rows} rows, held-out {test_rows} rows"
    )

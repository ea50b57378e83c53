"""check_tensor: what every reader of a wire tensor relies on, checked without numpy arrays."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.messages import Tensor
from schemas.tensors import MAX_DIMS, TensorError, check_tensor, tensor_from_array, tensor_to_array


@pytest.mark.parametrize(
    ("tensor", "detail"),
    [
        (Tensor("float32", [64], b"\x00"), "data has 1 bytes, but shape [64] of float32 needs 256"),
        (Tensor("float64", [2, 3], b"\x00" * 47), "needs 48"),
        (Tensor("float32", [0, 2**62], b""), "too large to address"),
        (Tensor("int8", [2**63], b""), "too large to address"),
        (Tensor("float32", [2**64 - 1], b""), "too large to address"),
        (Tensor("float32", [1] * (MAX_DIMS + 1), b"\x00" * 4), f"{MAX_DIMS + 1} dimensions"),
        (Tensor("float32", [-4], b""), "negative dimension"),
    ],
)
def test_a_tensor_no_reader_could_use_is_refused(tensor: Tensor, detail: str) -> None:
    with pytest.raises(TensorError) as caught:
        check_tensor(tensor)
    assert detail in str(caught.value)
    # tensor_to_array refuses the same tensors with the same error, never numpy's own.
    with pytest.raises(TensorError):
        tensor_to_array(tensor)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((0, 2**20), dtype=np.float32),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.ones([1] * MAX_DIMS, dtype=np.uint8),
        np.array(True),
    ],
)
def test_a_well_formed_tensor_passes_and_round_trips(array: np.ndarray) -> None:
    tensor = tensor_from_array(array)
    check_tensor(tensor)
    assert np.array_equal(tensor_to_array(tensor), array)

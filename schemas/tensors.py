"""Conversion between wire :class:`Tensor` and numpy arrays (zero-copy on decode)."""

from __future__ import annotations

import math
from typing import Final, cast, get_args

import numpy as np
import numpy.typing as npt

from schemas.messages import DType, Tensor

_DTYPES: Final[frozenset[str]] = frozenset(get_args(DType))
# np.dtype(name) per tensor costs more than the rest of check_tensor together.
_ITEMSIZES: Final[dict[str, int]] = {name: np.dtype(name).itemsize for name in _DTYPES}

MAX_DIMS: Final = 32
"""The most dimensions a wire tensor may have: numpy 1's limit (numpy 2 allows 64); no model
takes more than a handful."""
# The most bytes numpy can address in one array (its intp); a shape beyond it cannot be
# reshaped even with no elements (``[0, 2**62]``), so whoever reads the tensor would fail.
_MAX_ADDRESSABLE_BYTES: Final = 2**63 - 1


class TensorError(ValueError):
    """The tensor's buffer does not match its dtype and shape."""


def check_tensor(tensor: Tensor) -> None:
    """Raise :class:`TensorError` unless ``tensor`` can be read as an array: at most
    :data:`MAX_DIMS` non-negative dimensions that numpy can address, and a buffer of exactly
    ``dtype`` x ``shape`` bytes. Cheap (Python ints, no overflow, no numpy array built)."""
    shape = tensor.shape
    if len(shape) > MAX_DIMS:
        raise TensorError(f"shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise TensorError(f"shape {shape} has a negative dimension")
    itemsize = _ITEMSIZES.get(tensor.dtype) or np.dtype(tensor.dtype).itemsize
    expected = math.prod(shape) * itemsize
    if expected and len(tensor.data) == expected:
        return  # the common case: no zero dimension, so the size is addressable (it exists)
    if math.prod(d for d in shape if d) * itemsize > _MAX_ADDRESSABLE_BYTES:
        raise TensorError(f"shape {shape} of {tensor.dtype} is too large to address")
    if len(tensor.data) != expected:
        raise TensorError(
            f"data has {len(tensor.data)} bytes, but shape {shape} of {tensor.dtype} "
            f"needs {expected}"
        )


def tensor_to_array(tensor: Tensor) -> npt.NDArray[np.generic]:
    """A read-only numpy view of the tensor's buffer (``np.frombuffer``, no copy); raises
    :class:`TensorError` for what :func:`check_tensor` refuses."""
    check_tensor(tensor)
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


def tensor_from_array(array: npt.ArrayLike) -> Tensor:
    """A wire tensor holding a little-endian C-order copy of ``array``."""
    arr = np.asarray(array)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    name = little.dtype.name
    if name not in _DTYPES:
        raise TensorError(f"dtype {name} cannot travel on the wire; use one of {sorted(_DTYPES)}")
    return Tensor(
        dtype=cast(DType, name),
        shape=list(little.shape),
        data=np.ascontiguousarray(little).tobytes(),
    )

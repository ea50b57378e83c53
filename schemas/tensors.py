"""Conversion between wire :class:`Tensor` and numpy arrays (zero-copy on decode)."""

from __future__ import annotations

import math
from typing import Final, cast, get_args

import numpy as np
import numpy.typing as npt

from schemas.messages import DType, Tensor

_DTYPES: Final[frozenset[str]] = frozenset(get_args(DType))


class TensorError(ValueError):
    """The tensor's buffer does not match its dtype and shape."""


def tensor_to_array(tensor: Tensor) -> npt.NDArray[np.generic]:
    """A read-only numpy view of the tensor's buffer (``np.frombuffer``, no copy)."""
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"data has {len(tensor.data)} bytes, but shape {tensor.shape} of {tensor.dtype} "
            f"needs {expected}"
        )
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

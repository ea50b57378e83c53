"""Message contracts of the pipeline: versioned Structs, the MessagePack codec, topic and
header names, and the JSON Schema export for producers written in other languages."""

from schemas.codec import Codec, DecodeError
from schemas.headers import Headers
from schemas.messages import (
    RequestV1,
    ResultV1,
    StoredV1,
    Tensor,
    ValidatedRequestV1,
)
from schemas.tensors import tensor_from_array, tensor_to_array
from schemas.topics import Topics

__all__ = [
    "Codec",
    "DecodeError",
    "Headers",
    "RequestV1",
    "ResultV1",
    "StoredV1",
    "Tensor",
    "Topics",
    "ValidatedRequestV1",
    "tensor_from_array",
    "tensor_to_array",
]

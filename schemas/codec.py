"""MessagePack codec: small encoder/decoder objects, one decoder per message type."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class DecodeError(ValueError):
    """The bytes are not a valid message of the expected type; ``str()`` says why and where."""


class Codec(Generic[T]):
    """Encodes and decodes one message type to and from MessagePack.

    Decoding validates types and constraints (msgspec) and raises :class:`DecodeError` with
    a message a human understands (e.g. ``Expected `str`, got `int` - at `$.model```).
    """

    __slots__ = ("_decoder", "_encoder", "type")

    def __init__(self, type_: type[T]) -> None:
        self.type = type_
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)
        self._encoder = msgspec.msgpack.Encoder()

    def decode(self, data: bytes) -> T:
        """The message in ``data``; :class:`DecodeError` for ANY failure to decode it.

        Whatever the bytes are (they may come from any producer), nothing but
        :class:`DecodeError` leaves here: msgspec raises ``RecursionError`` for deeply nested
        input (about 1,000 levels), and a caller that only expects bad-record errors must not
        be stopped by it.
        """
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise DecodeError(str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise DecodeError(f"not valid MessagePack: {exc}") from exc
        except RecursionError:
            raise DecodeError("nested too deeply") from None
        except Exception as exc:  # e.g. TypeError for a non-bytes value, MemoryError
            raise DecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from exc

    def encode(self, message: T) -> bytes:
        return self._encoder.encode(message)

"""JSON Schema export of every message, for producers and consumers in other languages.

The files under ``schemas/jsonschema/`` are generated from the Structs by
``streaminfer schemas export`` and checked in; a unit test fails when they drift.

On the Kafka wire the values are MessagePack: a field the schema types as a base64 string
(``Tensor.data``) is a MessagePack ``bin`` there. Over HTTP/JSON it is base64.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Final

import msgspec

from schemas.messages import SCHEMA_NAMES

SCHEMA_DIR: Final = Path(__file__).parent / "jsonschema"
_WIRE_NOTE: Final = (
    "Kafka record value, MessagePack-encoded; header `schema` = `{name}`. "
    "Fields typed as base64 strings are MessagePack bin on the Kafka wire."
)


def file_name(schema_name: str) -> str:
    """``inference.request/1`` -> ``inference.request.v1.json``."""
    name, version = schema_name.split("/")
    return f"{name}.v{version}.json"


def generate() -> dict[str, str]:
    """File name -> JSON text, one self-contained schema per message type."""
    files: dict[str, str] = {}
    for struct, schema_name in SCHEMA_NAMES.items():
        schema: dict[str, Any] = normalise(msgspec.json.schema(struct))
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": schema_name,
            "title": schema_name,
            "description": _WIRE_NOTE.format(name=schema_name),
            **schema,
        }
        files[file_name(schema_name)] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def normalise(node: Any) -> Any:
    """``node`` with every ``description`` cleaned the way ``inspect.cleandoc`` cleans docstrings.

    msgspec renders a Struct's docstring as-is up to 0.22 and dedented from 0.23 on; cleaning
    it here makes the files the same whatever msgspec version generated them.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else normalise(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [normalise(item) for item in node]
    return node


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written

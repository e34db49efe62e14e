"""The circuit JSON Schema, a small checker for the part of JSON Schema it uses, and the checks a
circuit file passes before it is rebuilt.

The schema (``circuit.schema.json``, draft 2020-12) documents the edgeatp circuit format; files
are checked against it when read, so a hand-edited or truncated file is refused with the first
problem named instead of failing somewhere later. Nothing here imports torch, so the command line
refuses a file that is not a circuit at once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import EdgeatpError

FORMAT = "edgeatp.circuit"
VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("circuit.schema.json")


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The shipped JSON Schema of the circuit format."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` to its definition."""
    return _resolve(root["$defs"][schema["$ref"].split("/")[-1]], root) if "$ref" in schema else schema


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def violations(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, where: str = "$") -> list[str]:
    """The problems found checking ``value`` against ``schema`` (type, const, enum, required,
    properties, additionalProperties, items, minimum, anyOf, local ``$ref``); empty when valid."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "anyOf" in schema:
        if any(not violations(value, s, root, where) for s in schema["anyOf"]):
            return []
        return [f"{where}: {value!r} matches none of the allowed forms"]
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, t) for t in allowed):
            return [f"{where}: {value!r} is not {' or '.join(allowed)}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        return [f"{where}: {value!r} is below the minimum {schema['minimum']}"]
    out: list[str] = []
    if isinstance(value, dict):
        out += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                out += violations(v, props[k], root, f"{where}.{k}")
            elif extra is False:
                out.append(f"{where}: unexpected key {k}")
            elif isinstance(extra, dict):
                out += violations(v, extra, root, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += violations(v, schema["items"], root, f"{where}[{i}]")
    return out


def load_json_data(data: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A parsed JSON object from a dict, a JSON string (starting with ``{``) or a file path."""
    if isinstance(data, dict):
        return data
    if isinstance(data, str) and data.lstrip().startswith("{"):
        text, where = data, "the JSON text"
    else:
        path = Path(data)
        if not path.is_file():
            raise EdgeatpError(f"circuit file {str(path)!r} does not exist")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise EdgeatpError(f"{path} is not a text (UTF-8) file; pass a circuit JSON file") from None
        except OSError as exc:
            raise EdgeatpError(f"{path}: {exc.strerror or exc}") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise EdgeatpError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise EdgeatpError(f"{where} holds a JSON {type(parsed).__name__}, not an object")
    return parsed


def malformed(err: Exception) -> EdgeatpError:
    """The one-line error for circuit data missing a key or holding a value of the wrong kind."""
    return EdgeatpError(f"malformed circuit JSON: {f'missing key {err}' if isinstance(err, KeyError) else err}")


def check_circuit_data(d: dict[str, Any]) -> str:
    """The format of circuit data, ``"edgeatp"`` or ``"mib"``, once it is known to be a circuit of a
    version this edgeatp reads that follows the schema (version 2); else a one-line error."""
    if "format" not in d:
        if {"cfg", "nodes", "edges"} <= d.keys():
            return "mib"
        raise EdgeatpError("not a circuit: expected an edgeatp file (with 'format') or an MIB file "
                           "(with 'cfg', 'nodes' and 'edges')")
    if d["format"] != FORMAT:
        raise EdgeatpError(f"not an edgeatp circuit: format is {d['format']!r}, expected {FORMAT!r}")
    if "version" not in d:
        raise malformed(KeyError("version"))
    version = d["version"]
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise EdgeatpError(f"circuit file version {version!r} is not supported (this edgeatp reads "
                           f"version 1 to {VERSION}); upgrade edgeatp")
    if version == VERSION:
        problems = violations(d, load_schema())
        if problems:
            raise EdgeatpError(f"the circuit file does not follow the schema: {problems[0]}"
                               + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return "edgeatp"

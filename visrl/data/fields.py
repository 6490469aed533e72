"""Validated fields of JSON records: one error line naming the file, the record index and the field.

The record readers (:mod:`visrl.data.records`, :mod:`visrl.data.pair_records`) build typed views of raw JSON
objects with these helpers, so malformed input raises :class:`~visrl.data.errors.InputError` (a
``ValueError``) in one line, e.g. ``data.json: record 3: field 'bbox': expected 4 finite numbers, got [1, 2]``,
and a file that is not UTF-8 JSON, or empty, is named the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from visrl.data.errors import InputError

__all__ = [
    "MEMORY",
    "each_row",
    "field_error",
    "get_field",
    "load_json_list",
    "read_text",
    "turn_value",
    "with_extra",
]

MEMORY = "<memory>"  # the source of records built in memory
T = TypeVar("T")


def field_error(source: str, index: int, fieldname: str, message: str) -> InputError:
    """The one-line error for ``fieldname`` of record ``index`` in ``source``."""
    return InputError(f"{source}: record {index}: field '{fieldname}': {message}")


def get_field(
    raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str, index: int
) -> Any:
    """``raw[key]`` checked to be present and of ``kind`` (a bool is never a number)."""
    if key not in raw:
        raise field_error(source, index, key, "missing")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise field_error(source, index, key, f"expected {kind}, got {type(value).__name__} {value!r:.80}")
    return value


def turn_value(turn: Any, role: str, source: str, index: int, fieldname: str) -> str:
    """The ``value`` of a ``{"from": role, "value": str}`` turn."""
    if not isinstance(turn, Mapping):
        raise field_error(
            source, index, fieldname, f"expected a {{'from', 'value'}} object, got {turn!r:.80}"
        )
    if turn.get("from") != role:
        raise field_error(source, index, f"{fieldname}.from", f"expected {role!r}, got {turn.get('from')!r}")
    value = turn.get("value")
    if not isinstance(value, str):
        raise field_error(source, index, f"{fieldname}.value", f"expected a string, got {value!r:.80}")
    return value


def read_text(path: Path) -> str:
    """The file's UTF-8 text; a missing, unreadable or non-UTF-8 file is an InputError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e


def load_json_list(path: Path | str) -> list[Any]:
    """The JSON list in ``path``; anything else (empty, not JSON, not a list) is an InputError naming it."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path}: empty file (expected a JSON list of records)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def with_extra(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``extra`` keys appended after it; an extra key may not overwrite a record field."""
    clash = sorted(set(base) & set(extra or {}))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the record's own fields")
    return {**base, **(extra or {})}


def each_row(parse: Callable[[Any, int], T], raws: Sequence[Any]) -> list[T | InputError]:
    """``parse(raw, index)`` of each row, an unusable row as its :class:`InputError` in place."""
    out: list[T | InputError] = []
    for i, raw in enumerate(raws):
        try:
            out.append(raw if isinstance(raw, InputError) else parse(raw, i))
        except InputError as e:
            out.append(e)
    return out

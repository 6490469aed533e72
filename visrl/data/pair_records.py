"""VisRL preference pairs: LLaMA-Factory's sharegpt ranking layout (``conversations`` + ``chosen`` /
``rejected`` turns, ``images`` paths), with VisRL's step-level ``chosen_step`` / ``rejected_step`` box turns.

Like :mod:`visrl.data.records`, a record keeps the object it was read from (``raw``) and the writer re-emits
it; fields are validated on read, malformed input is one :class:`~visrl.data.errors.InputError` line naming
the file, the record index and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.data.fields import MEMORY, field_error, get_field, load_json_list, turn_value, with_extra
from visrl.data.io import write_text_atomic

__all__ = ["PreferenceRecord", "make_preference_record", "read_pairs", "write_pairs"]

_PREF_KEYS = ("images", "conversations", "chosen_step", "rejected_step", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceRecord:
    """One VisRL step-level pair (§3; LLaMA-Factory sharegpt ranking): ``images``, one human turn
    ``conversations[0]`` (the step-1 prompt), ``chosen_step``/``rejected_step`` (box texts) and
    ``chosen``/``rejected`` (answers), each ``{"from": "gpt", "value": ...}``. Extra keys are kept."""

    images: tuple[str, ...]
    prompt: str
    chosen_step: str
    rejected_step: str
    chosen: str
    rejected: str
    raw: dict[str, Any] = field(repr=False, hash=False)
    source: str = field(default=MEMORY, compare=False)
    index: int = field(default=-1, compare=False)

    @classmethod
    def from_raw(cls, raw: Any, source: str = MEMORY, index: int = -1) -> PreferenceRecord:
        if not isinstance(raw, dict):
            raise field_error(source, index, "<record>", f"expected an object, got {type(raw).__name__}")
        images = get_field(raw, "images", list, source, index)
        if not images or not all(isinstance(p, str) for p in images):
            raise field_error(
                source, index, "images", f"expected a non-empty list of paths, got {images!r:.120}"
            )
        turns = get_field(raw, "conversations", list, source, index)
        if len(turns) != 1:
            raise field_error(
                source, index, "conversations", f"expected 1 human turn, got {len(turns)} turns"
            )
        steps = {k: turn_value(raw.get(k), "gpt", source, index, k) for k in _PREF_KEYS[2:]}
        return cls(
            images=tuple(images),
            prompt=turn_value(turns[0], "human", source, index, "conversations[0]"),
            **steps,
            raw=raw,
            source=source,
            index=index,
        )

    @property
    def extra(self) -> dict[str, Any]:
        """Keys beyond the LLaMA-Factory columns (uid, scores, crop paths, ...)."""
        return {k: v for k, v in self.raw.items() if k not in _PREF_KEYS}


def make_preference_record(
    *,
    images: Sequence[str],
    prompt: str,
    chosen_step: str,
    rejected_step: str,
    chosen: str,
    rejected: str,
    extra: Mapping[str, Any] | None = None,
) -> PreferenceRecord:
    """Build a pair in the VisRL layout; ``extra`` keys are appended and preserved."""
    gpt = lambda v: {"from": "gpt", "value": v}  # noqa: E731
    base = {
        "images": list(images),
        "conversations": [{"from": "human", "value": prompt}],
        "chosen_step": gpt(chosen_step),
        "rejected_step": gpt(rejected_step),
        "chosen": gpt(chosen),
        "rejected": gpt(rejected),
    }
    return PreferenceRecord.from_raw(with_extra(base, extra))


def read_pairs(path: str | Path) -> list[PreferenceRecord]:
    """Read a pairs JSON list (``iter_k/pairs.json``)."""
    path = Path(path)
    return [PreferenceRecord.from_raw(raw, str(path), i) for i, raw in enumerate(load_json_list(path))]


def write_pairs(records: Iterable[PreferenceRecord], path: str | Path, indent: int | None = 2) -> None:
    """Write pairs as a list JSON, atomically (non-ASCII kept as is)."""
    write_text_atomic(path, json.dumps([r.raw for r in records], indent=indent, ensure_ascii=False))

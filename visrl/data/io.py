"""The one place that writes and reads the run's files: atomic writes and JSON / JSONL readers.

Every file that a later step (or a resumed run) reads back is written here, via a fsynced temporary file
in the same folder and ``os.replace``: a crash leaves the old file or the new one, never half of one.
JSONL files that grow during a step (``candidates.jsonl``, ``predictions.jsonl``) are appended in one
write per batch, then fsynced; a torn last line is a crash's signature and can be dropped on resume.
A file that is nevertheless unreadable is named in one line with what to delete to recover.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visrl.data.errors import InputError


class UnreadableFileError(InputError):
    """A run file that cannot be parsed; the message names the file and how to recover."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write ``data`` via a fsynced temporary file in the same folder (mode 0666 & ~umask, like ``open``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; files of a run are shared like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2))


def read_json(path: Path | str, recover: Path | str | None = None) -> Any:
    """The JSON value of ``path``; an empty or broken file raises :class:`UnreadableFileError` naming it and
    what to delete to recompute it (``recover``: the step folder that wrote it; default the file itself)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnreadableFileError(
            f"{path}: unreadable JSON ({exc}); delete {recover or path} and re-run to recompute it"
        ) from exc


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL row: the JSON object on ``line``, or a ValueError naming ``where`` (file and line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: Path | str, allow_torn_tail: bool) -> tuple[list[str], list[dict], bool]:
    """(lines, rows, torn) of a JSONL file written by :func:`append_lines`.

    A last line without its newline is a write cut short by a crash: it is dropped (``torn``) when
    ``allow_torn_tail``, else an error. Any other bad line is an error naming the file and line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pieces = text.split("\n")  # "\n" only: the rows are ASCII JSON (no other line breaks)
    torn = pieces[-1] != ""
    if torn and not allow_torn_tail:
        raise ValueError(f"{path}: line {len(pieces)}: incomplete last line (file cut short by a crash?)")
    lines = pieces[:-1]
    rows = [json_object(line, f"{path}: line {n}") for n, line in enumerate(lines, 1)]
    return lines, rows, torn


def append_lines(path: Path | str, lines: Sequence[str]) -> None:
    """Append ``lines`` in ONE write, then flush and fsync: after a crash they are all there or torn."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def rewrite_lines(path: Path | str, lines: Sequence[str]) -> None:
    """Replace the file's content by ``lines`` atomically."""
    write_text_atomic(path, "".join(line + "\n" for line in lines))

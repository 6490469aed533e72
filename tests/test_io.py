"""visrl/data/io.py: the one atomic writer and JSON/JSONL reader."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from visrl.data.errors import InputError
from visrl.data.io import UnreadableFileError, append_lines, read_json, read_jsonl, write_json_atomic


def test_atomic_files_get_the_usual_mode_not_0600(tmp_path: Path) -> None:
    """mkstemp creates 0600; the run's files (pairs.json, stats.json, data splits) are shared like any other."""
    mask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a" / "stats.json", {"n": 1})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a" / "stats.json").stat().st_mode) == 0o644
    assert read_json(tmp_path / "a" / "stats.json") == {"n": 1}
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_broken_json_names_the_file_and_what_to_delete(tmp_path: Path) -> None:
    path = tmp_path / "iter_1" / "eval" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(UnreadableFileError) as err:
        read_json(path, recover=path.parent)
    assert isinstance(err.value, InputError)  # an expected error: run.py prints it as one line
    assert str(path) in str(err.value) and f"delete {path.parent}" in str(err.value)


def test_jsonl_torn_tail_is_dropped_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    append_lines(path, ['{"a": 1}', '{"a": 2}'])
    with path.open("a") as f:
        f.write('{"a": 3')  # a write cut short by kill -9
    assert read_jsonl(path, allow_torn_tail=True)[1:] == ([{"a": 1}, {"a": 2}], True)
    with pytest.raises(ValueError, match="line 3: incomplete last line"):
        read_jsonl(path, allow_torn_tail=False)

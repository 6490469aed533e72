"""Label audit: building the preference data reads no ground-truth box of the RL pool (VisRL §3.3).

VisRL's self-evolution must need no box annotation beyond the small SFT split: the RL pool's boxes may be
read for analysis (``stats.json``'s ``gt`` block) but never to sample, score, filter or pair candidates.
The test runs the real pipeline (``python run.py debug=fast iter=1 logger=none``) three times on one
isolated cache: as written, then with the RL split file rewritten so that every record carries another
record's box (boxes rotated by one, their box-text turn too), then with every box removed. The
candidates and the pairs of iteration 1 must be byte-identical; the analysis block must change (so the
rewrite really reached the run) and vanish without boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

from visrl.data.records import VisCoTRecord, make_viscot_record, read_viscot, write_viscot


def rewritten(records: list[VisCoTRecord], boxes: list[tuple | None]) -> list[VisCoTRecord]:
    """The records with ``boxes[i]`` as record i's box (None: no box, and a box turn that names none)."""
    return [
        make_viscot_record(
            dataset=r.dataset, split=r.split, question_id=r.question_id, image_path=r.image_path,
            question=r.question, answer=r.answer, box_px=b, size=(256, 256) if b else None,
            box_text=None if b else "none",
        )
        for r, b in zip(records, boxes)
    ]  # fmt: skip


def iteration_files(run_dir: Path) -> tuple[bytes, bytes, dict]:
    it = run_dir / "iter_1"
    return (
        (it / "candidates.jsonl").read_bytes(),
        (it / "pairs.json").read_bytes(),
        json.loads((it / "stats.json").read_text()),
    )


def test_pairs_do_not_depend_on_the_rl_pool_boxes(run_visrl, tmp_path: Path) -> None:
    env = {"VISRL_CACHE": str(tmp_path / "cache")}  # its own data: the RL split is rewritten below
    runs = {}

    def run(name: str) -> None:
        result = run_visrl(tmp_path / name, "iter=1", "logger=none", env=env)
        assert result.returncode == 0, result.tail()
        runs[name] = iteration_files(tmp_path / name)

    run("as_written")
    (data,) = (tmp_path / "cache" / "synthetic").iterdir()
    original = read_viscot(data / "rl.json")
    boxes = [r.box_px for r in original]
    assert len(set(boxes)) > 1, "the RL pool's boxes are all equal: rotating them would change nothing"
    (data / "rl_scenes.json").unlink()  # the scene file (the boxes again) is gone too

    write_viscot(rewritten(original, boxes[1:] + boxes[:1]), data / "rl.json")
    assert [r.box_px for r in read_viscot(data / "rl.json")] != boxes
    run("rotated")
    write_viscot(rewritten(original, [None] * len(original)), data / "rl.json")
    run("removed")

    candidates, pairs, stats = runs["as_written"]
    assert json.loads(pairs), "no pairs: the audit would compare nothing"
    for name in ("rotated", "removed"):
        assert runs[name][0] == candidates, f"{name}: candidates differ"
        assert runs[name][1] == pairs, f"{name}: pairs differ"
        assert {k: v for k, v in runs[name][2].items() if k != "gt"} == {
            k: v for k, v in stats.items() if k != "gt"
        }
    assert stats["gt"]["questions_with_gt"] == len(original)
    assert runs["rotated"][2]["gt"] != stats["gt"], "the rotated boxes did not reach the run"
    assert runs["removed"][2].get("gt") is None

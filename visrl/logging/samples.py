"""What a person wants to see of an iteration besides numbers: sample preference pairs and the saved model.

A table of up to :data:`SAMPLE_PAIRS` pairs per iteration (image with the chosen and rejected boxes drawn,
the box texts, answers and M_org's scores: what the self-scored data of VisRL §3.3 looks like), the pairs
file as a dataset artifact, and each iteration's model as a model artifact when it is small enough to copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from visrl.data.io import read_json, read_jsonl
from visrl.logging.media import ImageWithBoxes

log = logging.getLogger(__name__)
SAMPLE_PAIRS = 8  # preference pairs shown per iteration in the W&B / CSV table
ARTIFACT_MAX_BYTES = 2 << 30  # larger saved models (merged 7B) are not copied into the logger's staging
PAIR_COLUMNS = (
    "uid", "image", "question", "chosen_box_text", "rejected_box_text", "chosen_answer", "rejected_answer",
    "chosen_answer_score", "chosen_crop_score", "rejected_answer_score", "rejected_crop_score",
)  # fmt: skip


def log_pair_samples(logger: Any, pairs_path: Path, image_root: Path, k: int) -> None:
    """Up to ``SAMPLE_PAIRS`` pairs of iteration ``k`` as a table, and the pairs file as an artifact."""
    rows = []
    for p in read_json(pairs_path)[:SAMPLE_PAIRS]:
        boxes = {"chosen": (p.get("chosen_box"), "chosen"), "rejected": (p.get("rejected_box"), "rejected")}
        image = ImageWithBoxes(Path(image_root) / p["image"], boxes, caption=p.get("question", ""))
        chosen, rejected = p.get("chosen_scores") or {}, p.get("rejected_scores") or {}
        texts = [p[key]["value"] for key in ("chosen_step", "rejected_step", "chosen", "rejected")]
        scores = [chosen.get("answer"), chosen.get("crop"), rejected.get("answer"), rejected.get("crop")]
        rows.append([p.get("uid"), image, p.get("question"), *texts, *scores])
    if rows:
        logger.log_table(f"pairs/iter_{k}", PAIR_COLUMNS, rows)
    logger.log_artifact(pairs_path, f"pairs_iter_{k}", "dataset")


def log_model_artifact(logger: Any, model_dir: Path, name: str) -> None:
    """The saved model as an artifact, unless it is too large to copy (then the log says so)."""
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    if size > ARTIFACT_MAX_BYTES:
        log.info("%s: %.1f GiB, not logged as an artifact (kept on disk)", model_dir, size / 2**30)
        return
    logger.log_artifact(model_dir, name, "model")


def log_predictions(logger: Any, path: Path, k: int, image_root: Path | None = None) -> None:
    """Iteration ``k``'s predictions from the model's own box (``cot_pred``; every row of a benchmark that has
    no modes) that name an image (``image``: absolute or under ``image_root``), as a table with boxes drawn."""
    if path.is_file():
        rows = read_jsonl(path, allow_torn_tail=True)[1]
        rows = [r for r in rows if r.get("mode", "cot_pred") == "cot_pred" and r.get("image")]
        if rows:
            logger.log_predictions(f"eval/predictions/iter_{k}", rows, image_root=image_root)


def report_run(run_dir: Path, logger: Any, summary: dict[str, Any] | None) -> dict[str, Any]:
    """The end of a run: the plots, and the final metric and effect with its CI, into the logger's summary;
    the results table printed (rank 0; ``summary`` is None on the other ranks)."""
    from visrl.logging.results import print_results

    if summary is None:
        return {}
    logger.log_images("plots", sorted((run_dir / "plots").glob("*.png")))
    logger.log_summary({key: summary[key] for key in ("final_metric", "effect") if key in summary})
    print_results(summary)
    return summary

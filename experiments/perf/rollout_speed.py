"""Rollout throughput: the batched generator vs. a one-candidate-at-a-time loop (VisRL §3.3 data generation).

The reference samples every candidate with its own API requests (one per box, one per answer, one per
judge score). ``visrl.rollout.generator`` batches each step of a whole chunk of questions into one
``generate`` call with a KV cache. This script times both on the same tiny backbone, questions, scorers
and seeds, alternating the two in each repeat, and prints JSON with the median candidates per second
and their ratio (goal: >= 10x).

A random-weight model almost never writes a parseable box, which would skip step 2 entirely; both paths
therefore run the model's real step-1 generation and then substitute a seeded random grid box for its
text (``ForcedBoxes``), so step 2 and the scoring run for every candidate, as they would for a trained
policy. Run: ``python experiments/perf/rollout_speed.py [--questions 16 --n-boxes 8 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from visrl.data.boxes import GridFormat
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.records import read_viscot
from visrl.data.synthetic import SplitSizes, SyntheticDataset
from visrl.models.policy import VLMPolicy
from visrl.models.tiny import build_tiny
from visrl.prompts import PromptTemplates
from visrl.rollout.generator import RolloutConfig, generate_candidates
from visrl.rollout.scorers import LikelihoodCropScorer, RuleAnswerScorer, ScoreItem

TEMPLATES = PromptTemplates(
    box="{question} Please provide the bounding box of the region that can help you answer the question.\n<image>",
    answer="{question} Please answer using the image and its zoomed region.\n<image>\n<image>",
    direct="{question}\n<image>",
)


class ForcedBoxes:
    """A VLMPolicy whose step-1 texts (one-image prompts) are replaced, after the real generation, by
    seeded random grid boxes; step-2 generation and scoring are untouched."""

    def __init__(self, policy: VLMPolicy, grid: int = 4) -> None:
        self.policy, self.backbone, self.model, self.grid = policy, policy.backbone, policy.model, grid
        self.seconds: dict[str, float] = {"box_generate": 0.0, "answer_generate": 0.0, "score": 0.0}

    def generate(self, prompts, **kw):
        t0 = time.perf_counter()
        out = self.policy.generate(prompts, **kw)
        step1 = {len(m.images) for p in prompts for m in p} == {1}
        self.seconds["box_generate" if step1 else "answer_generate"] += time.perf_counter() - t0
        if not step1:
            return out
        rng = random.Random(kw.get("seed"))
        return [[self._box(rng) for _ in texts] for texts in out]

    def _box(self, rng: random.Random) -> str:
        x1, y1 = rng.randrange(self.grid), rng.randrange(self.grid)
        return f"[{x1}, {y1}, {rng.randint(x1 + 1, self.grid)}, {rng.randint(y1 + 1, self.grid)}]"

    def completion_logprobs(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.policy.completion_logprobs(*args, **kw)
        self.seconds["score"] += time.perf_counter() - t0
        return out


def naive(policy: ForcedBoxes, records, root: Path, cfg: RolloutConfig, scorers) -> int:
    """One generate per box and per answer, one scorer call per candidate; returns the candidate count."""
    fmt, size = policy.backbone.box_format, policy.backbone.image_size
    n = 0
    for qi, rec in enumerate(records):
        image = load_rgb(resolve(root, rec.image_path))
        view = to_view(image, size)
        for c in range(cfg.n_boxes):
            seed = cfg.seed * 1_000_003 + qi * cfg.n_boxes + c
            text = policy.generate([TEMPLATES.box_prompt(rec.question, view)], max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, seed=seed)[0][0]  # fmt: skip
            n += 1
            parsed = fmt.parse(text, image.size)
            if not parsed.ok:
                continue
            crop = crop_view(image, parsed.box, size)
            answer = policy.generate([TEMPLATES.answer_prompt(rec.question, view, crop)],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.answer_temperature,
                                     seed=seed + 1)[0][0]  # fmt: skip
            item = ScoreItem(rec.question, rec.answer, answer, view, crop)
            for scorer in scorers:
                scorer.score([item], policy)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--n-boxes", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)  # conf/rollout/default.yaml
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="rollout_speed_"))
    ds = SyntheticDataset(tmp / "data", sizes=SplitSizes(sft=1, rl=args.questions, test=1))
    records = read_viscot(ds.ensure()["rl"])
    backbone = build_tiny("qwen2vl", box_format=GridFormat(grid=4))
    policy = ForcedBoxes(VLMPolicy(backbone, batch_size=args.questions * args.n_boxes))
    cfg = RolloutConfig(n_boxes=args.n_boxes, batch_size=args.questions, max_new_tokens=args.max_new_tokens)
    scorers = (RuleAnswerScorer(), LikelihoodCropScorer(template=TEMPLATES.direct))
    times: dict[str, list[float]] = {"batched": [], "naive": []}
    count, phases = {}, {}
    for r in range(args.repeats):
        for mode in ("batched", "naive") if r % 2 == 0 else ("naive", "batched"):
            policy.seconds = dict.fromkeys(policy.seconds, 0.0)
            t0 = time.perf_counter()
            if mode == "batched":
                rows = generate_candidates(policy, policy, records, TEMPLATES, cfg, *scorers,
                                           tmp / f"run{r}" / "candidates.jsonl", ds.image_root)  # fmt: skip
                count[mode] = len(rows)
            else:
                count[mode] = naive(policy, records, ds.image_root, cfg, scorers)
            times[mode].append(time.perf_counter() - t0)
            phases[mode] = {k: round(v, 3) for k, v in policy.seconds.items()}  # the last repeat's
    rate = {m: count[m] / statistics.median(t) for m, t in times.items()}
    print(json.dumps({
        "questions": args.questions, "n_boxes": args.n_boxes, "max_new_tokens": args.max_new_tokens,
        "candidates": count, "seconds": times, "last_repeat_phase_seconds": phases,
        "batched_candidates_per_s": rate["batched"], "naive_candidates_per_s": rate["naive"],
        "speedup": rate["batched"] / rate["naive"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

"""Rollout throughput: the batched generator vs. a one-candidate-at-a-time loop (VisRL §3.3 data generation).

The reference samples every candidate with its own API requests (one per box, one per answer, one per
judge score). ``visrl.rollout.generator`` batches each step of a whole chunk of questions into one
``generate`` call, and ``VLMPolicy`` removes the work those calls would repeat: the vision tower runs once
per distinct image (the full view is shared by a question's candidates and by both steps; a crop is
reused by the crop scorer), and a shared prompt prefix (a step-1 prompt's K samples; a question's K
step-2 prompts up to their crop) is prefilled once. This script times the generator and the naive loop
on the same tiny backbone, questions, scorers and seeds, alternating the modes in each repeat, and prints
JSON with the median wall and CPU seconds, candidates per second and their ratio (goal: >= 10x). The
naive loop is the reference's: one generate per box and per answer, one scorer call per candidate, no
feature reuse across calls. ``--ablation`` also times the generator with the shortcuts switched off one
by one (``batched_plain`` = Hugging Face's plain batched ``generate``, as before the shortcuts).

A random-weight model almost never writes a parseable box, which would skip step 2 entirely; both paths
therefore run the model's real step-1 generation and then substitute a seeded random grid box for its
text (``ForcedBoxes``), so step 2 and the scoring run for every candidate, as they would for a trained
policy. Run: ``python experiments/perf/rollout_speed.py [--questions 16 --n-boxes 8 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from visrl.data.box_formats import GridFormat
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.records import read_viscot
from visrl.data.synthetic import SplitSizes, SyntheticDataset
from visrl.models.policy import VLMPolicy
from visrl.models.tiny import build_tiny
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

    def __init__(self, policy: VLMPolicy, grid: int = 4, reuse_vision: bool = True) -> None:
        self.policy, self.backbone, self.model, self.grid = policy, policy.backbone, policy.model, grid
        self.reuse_vision = reuse_vision
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

    def vision_cache(self) -> AbstractContextManager:
        """The generator keeps vision features for a chunk in this block (off: per call only)."""
        return self.policy.vision_cache() if self.reuse_vision else nullcontext()

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


def policies(backbone, batch_size: int, ablation: bool) -> dict[str, ForcedBoxes]:
    """The timed generator variants (``naive`` runs on the default policy, outside any cache block)."""
    variants = {"batched": (True, True, True)}  # precompute_vision, share_prefixes, reuse across calls
    if ablation:
        variants.update(
            batched_no_reuse=(True, True, False),
            batched_no_prefix=(True, False, True),
            batched_plain=(False, False, False),
        )
    out = {}
    for name, (vision, prefixes, reuse) in variants.items():
        policy = VLMPolicy(backbone, batch_size=batch_size)
        policy.precompute_vision, policy.share_prefixes = vision, prefixes
        out[name] = ForcedBoxes(policy, reuse_vision=reuse)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--n-boxes", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)  # conf/rollout/default.yaml
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ablation", action="store_true", help="also time the shortcuts switched off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="rollout_speed_"))
    ds = SyntheticDataset(tmp / "data", sizes=SplitSizes(sft=1, rl=args.questions, test=1))
    records = read_viscot(ds.ensure()["rl"])
    backbone = build_tiny("qwen2vl", box_format=GridFormat(grid=4))
    variants = policies(backbone, args.questions * args.n_boxes, args.ablation)
    cfg = RolloutConfig(n_boxes=args.n_boxes, batch_size=args.questions, max_new_tokens=args.max_new_tokens)
    scorers = (RuleAnswerScorer(), LikelihoodCropScorer(template=TEMPLATES.direct))
    modes = [*variants, "naive"]
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    count, phases, files = {}, {}, {}
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate the order: drift hits all modes
            policy = variants.get(mode, variants["batched"])
            policy.seconds = dict.fromkeys(policy.seconds, 0.0)
            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "naive":
                count[mode] = naive(policy, records, ds.image_root, cfg, scorers)
            else:
                path = tmp / f"{mode}{r}" / "candidates.jsonl"
                count[mode] = len(generate_candidates(policy, policy, records, TEMPLATES, cfg, *scorers,
                                                      path, ds.image_root))  # fmt: skip
                files[mode] = path.read_text().splitlines()[1:]  # rows (line 0: meta with the config)
            wall[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
            phases[mode] = {k: round(v, 3) for k, v in policy.seconds.items()}  # the last repeat's
    print(json.dumps(report(args, count, wall, cpu, phases, files), indent=2))


def report(args, count, wall, cpu, phases, files) -> dict:
    """Medians, candidates/s and speedups over the naive loop (wall and CPU time)."""
    med = {m: statistics.median(t) for m, t in wall.items()}
    med_cpu = {m: statistics.median(t) for m, t in cpu.items()}
    return {
        "questions": args.questions, "n_boxes": args.n_boxes, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "candidates": count,
        "wall_seconds": {m: [round(x, 3) for x in t] for m, t in wall.items()},
        "cpu_seconds": {m: [round(x, 3) for x in t] for m, t in cpu.items()},
        "last_repeat_phase_seconds": phases,
        "candidates_per_s": {m: round(count[m] / t, 2) for m, t in med.items()},
        "speedup": {m: round(med["naive"] / t, 2) for m, t in med.items() if m != "naive"},
        "speedup_cpu": {m: round(med_cpu["naive"] / t, 2) for m, t in med_cpu.items() if m != "naive"},
        "same_rows_as_batched": {m: rows == files["batched"] for m, rows in files.items()},
    }  # fmt: skip


if __name__ == "__main__":
    main()

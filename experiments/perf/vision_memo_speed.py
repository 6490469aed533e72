"""Training-step time with and without the exact memos (frozen vision features, M-RoPE positions), same rows.

The tiny backbones keep the vision tower frozen at its random init, so a row's image features never change
(:mod:`visrl.models.vision_memo` encodes each distinct image once, ``model.vision_memo_mb``), and Qwen's
rotary positions are a function of the row (:mod:`visrl.models.rope_memo`, always on). This script builds
a preset's backbone and base-skill rows (the base stage is the longest part of a fresh run), then times
training steps (forward, backward, AdamW) over the same shuffled step-bucketed batches, first with both memos
off, then on (the first epoch fills them; later epochs hit). It prints JSON: ms per step per epoch of each
mode, the warm-epoch speed-up, and whether both modes reached bit-identical weights.

    python experiments/perf/vision_memo_speed.py [--preset intent] [--scenes 200] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from visrl.data.skills import base_rows  # noqa: E402 (after the path set-up)
from visrl.models.backbone import freeze_vision  # noqa: E402
from visrl.models.logprobs import sequence_logps  # noqa: E402
from visrl.models.rope_memo import remove_rope_memo  # noqa: E402
from visrl.pipeline import build_backbone  # noqa: E402
from visrl.training.datamodules import RowsDataModule  # noqa: E402


def timed_epochs(cfg, memo_mb: int, scenes: int, epochs: int) -> tuple[list[float], torch.Tensor]:
    """ms per step of each epoch, and the trained weights flattened (for the exactness check)."""
    torch.manual_seed(0)
    bb = freeze_vision(build_backbone(cfg), memo_mb << 20)
    if not memo_mb:
        remove_rope_memo(bb.base_model.model)
    templates, world, skills = (
        instantiate(cfg.prompt),
        instantiate(cfg.data.world),
        instantiate(cfg.base.skills),
    )
    skills = type(skills)(**{**skills.__dict__, "n_scenes": scenes})
    rows = base_rows(world, skills, bb, templates)
    dm = RowsDataModule(rows, bb.encoder, int(cfg.base.batch_size), 512, seed=0, knob="base.max_length")
    params = [p for p in bb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    per_epoch, loader = [], dm.train_dataloader()  # its sampler reshuffles on every pass
    for _ in range(epochs):
        start, steps = time.perf_counter(), 0
        for batch in loader:
            logps, n = sequence_logps(bb.model, batch)
            loss = -(logps / n.clamp(min=1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        per_epoch.append((time.perf_counter() - start) / steps * 1000)
    return per_epoch, torch.cat([p.detach().flatten() for p in params])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="intent")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"experiment={args.preset}"])
    off, w_off = timed_epochs(cfg, 0, args.scenes, args.epochs)
    on, w_on = timed_epochs(cfg, int(cfg.model.vision_memo_mb or 1024), args.scenes, args.epochs)
    warm_off, warm_on = statistics.median(off[1:]), statistics.median(on[1:])
    print(json.dumps({
        "preset": args.preset, "scenes": args.scenes, "threads": args.threads,
        "ms_per_step_off": [round(x, 1) for x in off], "ms_per_step_on": [round(x, 1) for x in on],
        "warm_speedup": round(warm_off / warm_on, 2), "identical_weights": bool(torch.equal(w_off, w_on)),
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

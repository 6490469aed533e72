"""Benchmark: step-level DPO training speed and peak memory, visrl's StepDPOModule vs TRL's DPOTrainer.

Both contenders train the same tiny Qwen2-VL-class model (``conf/model/tiny_qwen2vl.yaml`` sizes unless
overridden) from the same weights on the same preference pairs — box-step pairs (one-image prompts) and
answer-step pairs (image + crop prompts), built with the tiny prompt templates (``conf/prompt/tiny.yaml``)
— with the same batch size, epochs, optimizer (AdamW, cosine schedule with 10% warm-up, gradient clipping
at 1.0), fp32, full fine-tuning with a frozen reference copy (``--lora``: LoRA, reference = adapter
disabled), gradient checkpointing off, one process, ``--threads`` intra-op threads.

What each timed region contains (everything from raw pairs in memory to a trained model):

* ours: encode the rows (prompt tokens + vision tensors, once per row), precompute the reference
  log-probs once (a frozen deep copy, then dropped; :func:`compute_reference_logps`), then a Lightning
  ``Trainer.fit`` of :class:`StepDPOModule` with stage-2 weights on batches bucketed by step and length
  (:class:`StepBucketSampler`), each pair's prompt encoded once (:mod:`visrl.training.pair_logps`);
* TRL: deep-copy the reference, build the ``datasets.Dataset`` and the ``DPOTrainer`` (its collator
  processes images and tokenises on every step), then ``trainer.train()`` (reference forward every step;
  TRL refuses ``precompute_ref_log_probs`` for vision data).

``pairs_per_s`` = (pairs x epochs) / region seconds; ``train_pairs_per_s`` uses the fit / train() time only.
Memory: each run is its own subprocess; the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``)
when the region starts, and ``peak_rss_mb`` = VmHWM at its end - VmRSS at its start (what training adds
on top of the loaded policy; interpreter, imports and the policy weights excluded, identically for both).
``tracemalloc`` would miss torch's C++ allocations, hence RSS. Contenders alternate (ABAB / BABA per
repeat) and the report gives medians over ``--repeats``.

    python experiments/perf/dpo_speed.py --pairs 64 --epochs 2 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CONTENDERS = ("ours", "trl", "ours-concat", "ours-ref-per-step")
SIZE_KEYS = (
    "text_hidden",
    "text_layers",
    "heads",
    "vision_hidden",
    "vision_layers",
    "patch_size",
    "merge_size",
    "image_size",
    "vocab_size",
)


def _status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in kB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build(args: argparse.Namespace):
    """The tiny backbone, the prompt templates and ``args.pairs`` raw questions (deterministic)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from visrl.models.tiny import build_tiny

    spec = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny_qwen2vl.yaml"))
    sizes = {k: spec[k] for k in SIZE_KEYS}
    overrides = {"text_hidden": args.text_hidden, "text_layers": args.text_layers}
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    backbone = build_tiny("qwen2vl", **sizes, seed=0)
    templates = instantiate(OmegaConf.load(REPO / "conf/prompt/tiny.yaml"))
    rng = np.random.default_rng(0)
    side = sizes["image_size"]
    raw = []
    for _ in range(args.pairs):
        full, crop = (
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(2)
        )
        colour, shape = rng.choice(COLOURS, 2, replace=False), rng.choice(SHAPES)
        boxes = [sorted(rng.integers(0, 5, 2)) for _ in range(4)]
        raw.append(
            {
                "question": f"What colour is the {shape}?",
                "full": full,
                "crop": crop,
                "box": [
                    f"[{boxes[0][0]}, {boxes[1][0]}, {boxes[0][1]}, {boxes[1][1]}]",
                    f"[{boxes[2][0]}, {boxes[3][0]}, {boxes[2][1]}, {boxes[3][1]}]",
                ],
                "answer": [f"{colour[0]} {shape}", f"{colour[1]}"],
            }
        )
    return backbone, templates, raw


def _prompt(templates, item: dict, step: str):
    if step == "box":
        return templates.box_prompt(item["question"], item["full"])
    return templates.answer_prompt(item["question"], item["full"], item["crop"])


def _pair_collate(rows: list, encoder):
    """B rows of one step -> a StepDPOModule PairBatch (+ reference log-probs when the rows carry them)."""
    from visrl.data.rows import pair_batch

    return pair_batch(rows, encoder)


def run_ours(args, backbone, templates, raw) -> tuple[float, float]:
    """Encode, precompute the reference once, fit StepDPOModule; returns (region s, fit s).

    Ablations (``--ablations``): ``ours-concat`` scores chosen and rejected as two rows (prompt encoded
    twice, as TRL does); ``ours-ref-per-step`` runs the reference forward in every step instead of once.
    """
    import pytorch_lightning as pl
    import torch

    from visrl.data.rows import Row, RowDataset, StepBucketSampler
    from visrl.models.backbone import apply_lora
    from visrl.training.reference import (
        AdapterDisabledReference,
        FrozenCopyReference,
        compute_reference_logps,
    )
    from visrl.training.sft import warmup_cosine
    from visrl.training.step_dpo import StepDPOModule

    share = args.worker != "ours-concat"
    start = time.perf_counter()
    enc = backbone.encoder
    rows = [
        Row(
            enc.encode_prompt(_prompt(templates, item, step)),
            tuple(enc.encode_completion(t) for t in item[step]),
            step,
            str(i),
        )
        for i, item in enumerate(raw)
        for step in ("box", "answer")
    ]
    if args.lora:
        model = apply_lora(backbone, r=8, alpha=16).model
        reference = AdapterDisabledReference(model, share_prompt=share)
    else:
        model = backbone.model
        reference = FrozenCopyReference(model, share_prompt=share)  # a deep copy
    if args.worker != "ours-ref-per-step":
        for row, ref in zip(rows, compute_reference_logps(reference, rows, enc, batch_size=args.batch_size)):
            row.ref_logps = ref
        reference = None  # the frozen copy is dropped: training holds one model
    loader = torch.utils.data.DataLoader(
        RowDataset(rows),
        batch_sampler=StepBucketSampler(rows, args.batch_size, seed=0),
        collate_fn=partial(_pair_collate, encoder=enc),
    )
    module = StepDPOModule(
        model,
        partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0),
        partial(warmup_cosine, warmup_ratio=0.1),
        weights={"box": 0.5, "answer": 0.5},
        beta=0.1,
        reference=reference,
        share_prompt=share,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        gradient_clip_val=1.0,
        log_every_n_steps=50,
    )
    fit_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    end = time.perf_counter()
    return end - start, end - fit_start


def run_trl(args, backbone, templates, raw, out_dir: Path) -> tuple[float, float]:
    """Build TRL's dataset and DPOTrainer, then train; returns (region s, train() s)."""
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from visrl.models.backbone import LANGUAGE_MODEL_LORA_REGEX

    start = time.perf_counter()
    enc = backbone.encoder
    examples = []
    for item in raw:
        for step in ("box", "answer"):
            prompt = _prompt(templates, item, step)
            examples.append(
                {
                    "images": [im for message in prompt for im in message.images],
                    "prompt": enc.conversation(prompt),
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": item[step][0]}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": item[step][1]}]}],
                }
            )
    config = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LANGUAGE_MODEL_LORA_REGEX)
    trainer = DPOTrainer(
        model=backbone.model,
        ref_model=None if args.lora else copy.deepcopy(backbone.model),
        args=config,
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=enc.processor,
        peft_config=lora if args.lora else None,
    )
    train_start = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    return end - start, end - train_start


def worker(args: argparse.Namespace) -> dict:
    """One contender, one repeat, in this (fresh) process."""
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    backbone, templates, raw = build(args)
    # import the contender's libraries before the region: import time and memory are not training
    if args.worker.startswith("ours"):
        import pytorch_lightning  # noqa: F401

        import visrl.training.step_dpo  # noqa: F401
    else:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        _reset_peak()
        before = _status()["VmRSS"]
        if args.worker.startswith("ours"):
            seconds, train_seconds = run_ours(args, backbone, templates, raw)
        else:
            seconds, train_seconds = run_trl(args, backbone, templates, raw, Path(tmp))
        peak = _status()["VmHWM"]
    done = 2 * args.pairs * args.epochs  # box + answer pairs, every epoch
    return {
        "contender": args.worker,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "pairs_per_s": done / seconds,
        "train_pairs_per_s": done / train_seconds,
        "peak_rss_mb": (peak - before) / 1024,
    }


def _run_worker(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"dpo_speed worker {name!r} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=64, help="questions; each gives a box and an answer pair"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--text-hidden", type=int, default=None, help="override the tiny config's text_hidden"
    )
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--lora", action="store_true", help="LoRA (reference = adapter disabled)")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also time ours-concat (no shared prompt) and ours-ref-per-step (no precompute)",
    )
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    passthrough = [
        f"--pairs={args.pairs}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--lr={args.lr}",
        f"--threads={args.threads}",
    ]
    passthrough += [
        f"--{k.replace('_', '-')}={v}"
        for k, v in (("text_hidden", args.text_hidden), ("text_layers", args.text_layers))
        if v
    ]
    passthrough += ["--lora"] if args.lora else []
    names = CONTENDERS if args.ablations else CONTENDERS[:2]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order between repeats
            runs[name].append(_run_worker(name, passthrough))
            print(json.dumps(runs[name][-1]), file=sys.stderr)
    med = {
        name: {k: statistics.median(run[k] for run in rs) for k in rs[0] if k != "contender"}
        for name, rs in runs.items()
    }
    report = {"setup": {k: v for k, v in vars(args).items() if k != "worker"}, **med}
    for name in names:
        if name != "trl":
            report[f"{name}/speedup_pairs_per_s"] = med[name]["pairs_per_s"] / med["trl"]["pairs_per_s"]
            report[f"{name}/speedup_train_pairs_per_s"] = (
                med[name]["train_pairs_per_s"] / med["trl"]["train_pairs_per_s"]
            )
            report[f"{name}/peak_memory_ratio"] = med[name]["peak_rss_mb"] / med["trl"]["peak_rss_mb"]
    report["runs"] = runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

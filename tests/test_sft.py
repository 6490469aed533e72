"""SFT warm-up (VisRL §3.2): the rows of visrl/data/sft.py and the training of visrl/training/sft.py.

On the smallest tiny Qwen2-VL backbone and a 4-record synthetic SFT split:

* a few steps of ``SFTModule`` + ``RowsDataModule`` through ``visrl.training.fit.fit`` lower the mean NLL of
  the training rows (measured with ``sequence_logps`` before and after) and change every trainable tensor;
* under ``apply_lora`` only the adapter tensors train (and change), the base weights stay bit-identical and the
  checkpoint holds the adapter only;
* the loss is the token-mean NLL of the assistant tokens alone (labels -100 on prompt and padding);
* step-1 rows teach the box as GridFormat writes it, step-2 rows show the crop of that *written* box (checked
  on the encoded pixels, so the test does not depend on how sft_rows computes it);
* over-long rows are dropped and counted, never truncated; a record without a box is a clear error.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from visrl.data.box_formats import GridFormat
from visrl.data.errors import InputError
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord, make_viscot_record, read_viscot
from visrl.data.rows import Row
from visrl.data.sft import drop_long, sft_rows
from visrl.data.synthetic import SplitSizes, SyntheticDataset
from visrl.models.backbone import Backbone, apply_lora
from visrl.models.encoding import IGNORE_INDEX
from visrl.models.logprobs import sequence_logps
from visrl.models.tiny import build_tiny
from visrl.training.datamodules import RowsDataModule
from visrl.training.fit import fit, trainable_state
from visrl.training.sft import SFTModule, warmup_cosine

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
TEMPLATES: PromptTemplates = instantiate(OmegaConf.load(CONF / "prompt" / "tiny.yaml"))
TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
}
ADAMW = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)


def tiny() -> Backbone:
    return build_tiny(
        "qwen2vl",
        text_hidden=32,
        text_layers=1,
        heads=2,
        vision_hidden=32,
        vision_layers=1,
        box_format=GridFormat(grid=4),
    )


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[VisCoTRecord], Path]:
    """Four box-annotated synthetic records and their image root."""
    ds = SyntheticDataset(tmp_path_factory.mktemp("synthetic"), sizes=SplitSizes(sft=4, rl=1, test=1))
    return read_viscot(ds.ensure()["sft"]), ds.image_root


def batch_of(backbone: Backbone, rows: list[Row]) -> dict[str, torch.Tensor]:
    return backbone.encoder.collate([r.prompt for r in rows], [r.completions[0] for r in rows], "right")


def mean_nll(backbone: Backbone, rows: list[Row]) -> float:
    """Token-mean NLL of the rows' completions (eval mode, no grad)."""
    backbone.model.eval()
    with torch.no_grad():
        logps, n_tokens = sequence_logps(backbone.model, batch_of(backbone, rows))  # [B], [B]
    return float(-logps.sum() / n_tokens.sum())


def train(backbone: Backbone, rows: list[Row], out: Path, epochs: int = 3, **trainer) -> None:
    """SFT with AdamW lr 3e-3 and the warm-up cosine schedule: 2 batches of 4 per epoch."""
    dm = RowsDataModule(rows, backbone.encoder, batch_size=4, max_length=1024, seed=0)
    module = SFTModule(backbone.model, ADAMW, functools.partial(warmup_cosine, warmup_ratio=0.1))
    fit(module, dm, out, epochs, {**TRAINER, **trainer}, progress_bar=False)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ training
def test_sft_lowers_the_loss_and_changes_every_trainable_parameter(split, tmp_path: Path) -> None:
    records, root = split
    backbone = tiny()
    rows = sft_rows(records, root, backbone, TEMPLATES)
    before, start = mean_nll(backbone, rows), snapshot(backbone.model)
    train(backbone, rows, tmp_path)
    after = mean_nll(backbone, rows)
    assert after < before - 0.2, f"SFT did not lower the loss: {before:.3f} -> {after:.3f}"
    trainable = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(start)  # full fine-tuning: everything trains
    unchanged = [n for n, p in backbone.model.named_parameters() if torch.equal(p, start[n])]
    assert not unchanged, f"parameters never updated: {unchanged}"


def test_lora_sft_trains_only_the_adapter(split, tmp_path: Path) -> None:
    records, root = split
    with torch.random.fork_rng(devices=[]):  # the adapter's A matrices come from the global generator
        torch.manual_seed(0)
        backbone = apply_lora(tiny(), r=4, alpha=8, dropout=0.0)
    rows = sft_rows(records, root, backbone, TEMPLATES)
    before, start = mean_nll(backbone, rows), snapshot(backbone.model)
    train(backbone, rows, tmp_path, enable_checkpointing=True)
    assert mean_nll(backbone, rows) < before
    named = dict(backbone.model.named_parameters())
    adapter = {n for n, p in named.items() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    assert all(not torch.equal(named[n], start[n]) for n in adapter), "an adapter tensor never changed"
    frozen_changed = [n for n in named if n not in adapter and not torch.equal(named[n], start[n])]
    assert not frozen_changed, f"frozen base weights changed: {frozen_changed[:3]}"
    # what a stage checkpoint keeps (the file itself is removed once the fit completes; test_fit_resume)
    ckpt = {"state_dict": {f"model.{n}": t for n, t in backbone.model.state_dict().items()}}
    trainable_state(SimpleNamespace(model=backbone.model), ckpt)
    assert set(ckpt["state_dict"]) == {f"model.{n}" for n in adapter}  # adapters, not a full model copy


def test_a_model_without_trainable_parameters_is_an_error() -> None:
    model = tiny().model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SFTModule(model, ADAMW).configure_optimizers()


def test_loss_is_the_token_mean_nll_of_the_assistant_tokens_only(split) -> None:
    records, root = split
    backbone = tiny()
    rows = sft_rows(records, root, backbone, TEMPLATES)[:3]  # box, answer, box: mixed prompt lengths
    batch = batch_of(backbone, rows)
    labels = batch["labels"]  # [B, T]
    for i, row in enumerate(rows):
        p, c = len(row.prompt.input_ids), len(row.completions[0])
        assert torch.all(labels[i, :p] == IGNORE_INDEX), "prompt tokens carry labels"
        assert labels[i, p : p + c].tolist() == row.completions[0]
        assert torch.all(labels[i, p + c :] == IGNORE_INDEX), "padding carries labels"
    backbone.model.eval()
    with torch.no_grad():
        loss = SFTModule(backbone.model, ADAMW)._loss(batch)
        logits = backbone.model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, T, V]
    manual = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)


# ------------------------------------------------------------------------------------ rows
def test_rows_teach_the_written_box_and_crop_from_it(split) -> None:
    records, root = split
    backbone = tiny()
    enc, fmt = backbone.encoder, backbone.box_format
    rows = sft_rows(records, root, backbone, TEMPLATES)
    assert [r.step for r in rows] == ["box", "answer"] * len(records)
    for rec, box_row, answer_row in zip(records, rows[::2], rows[1::2]):
        image = load_rgb(resolve(root, rec.image_path))
        full = to_view(image, backbone.image_size)
        box_text = fmt.format(rec.box(image.size), image.size)
        assert enc.decode(box_row.completions[0]) == box_text
        assert enc.decode(answer_row.completions[0]) == rec.answer
        assert box_row.uid == answer_row.uid == f"synthetic:sft:{rec.question_id}"
        expected = enc.encode_prompt(TEMPLATES.box_prompt(rec.question, full))
        assert box_row.prompt.input_ids == expected.input_ids
        assert torch.equal(box_row.prompt.vision["pixel_values"], expected.vision["pixel_values"])
        # step 2: the crop of the box as the format writes it (the grid cell), not of the exact box
        written = fmt.parse(box_text, image.size).box
        pixels = {
            name: enc.encode_prompt(
                TEMPLATES.answer_prompt(rec.question, full, crop_view(image, box, backbone.image_size))
            ).vision["pixel_values"]
            for name, box in (("written", written), ("exact", rec.box(image.size)))
        }
        assert not torch.equal(pixels["written"], pixels["exact"]), "test needs boxes off the grid"
        assert torch.equal(answer_row.prompt.vision["pixel_values"], pixels["written"])


def test_steps_select_the_rows(split) -> None:
    records, root = split
    rows = sft_rows(records, root, tiny(), TEMPLATES, steps=("answer",))
    assert [r.step for r in rows] == ["answer"] * len(records)


def test_over_long_rows_are_dropped_and_counted_never_truncated(split) -> None:
    records, root = split
    backbone = tiny()
    rows = sft_rows(records, root, backbone, TEMPLATES)
    box_max = max(r.length for r in rows if r.step == "box")
    assert box_max < min(r.length for r in rows if r.step == "answer")  # two images make step 2 longer
    lengths = [r.length for r in rows]
    dm = RowsDataModule(rows, backbone.encoder, batch_size=4, max_length=box_max)
    assert dm.dropped == Counter({"answer": len(records)})
    assert [id(r) for r in dm.rows] == [id(r) for r in rows if r.step == "box"]
    assert [r.length for r in rows] == lengths  # nothing was cut
    kept, dropped = drop_long(rows, max_length=max(lengths))
    assert kept == rows and not dropped  # a row of exactly max_length is kept
    with pytest.raises(
        InputError, match=r"longer than sft.max_length=10 tokens.*raise sft.max_length"
    ) as err:
        RowsDataModule(rows, backbone.encoder, batch_size=4, max_length=10)
    assert "\n" not in str(err.value)  # one line: run.py shows it as is (issue: no rows left in a 7B recipe)


def test_a_record_without_a_box_is_an_error_naming_it(split) -> None:
    records, root = split
    good = records[0]
    boxless = make_viscot_record(
        dataset="synthetic",
        split="sft",
        question_id="no-box-7",
        image_path=good.image_path,
        question=good.question,
        answer=good.answer,
        box_text="[0.1, 0.1, 0.5, 0.5]",
    )
    with pytest.raises(ValueError, match=r"record 1 \(synthetic:no-box-7\) has no box"):
        sft_rows([good, boxless], root, tiny(), TEMPLATES)

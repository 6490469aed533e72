"""The README runs as written: its blocks marked ``<!-- test: quick -->`` in a fresh copy of the repository,
and the "load a trained model" block on a LoRA-saved tiny checkpoint of the real Qwen2-VL classes.

A README command that drifts from the code (a renamed option, an output folder, an API) fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(tag: str) -> list[str]:
    """Code blocks right after a ``<!-- test: <tag> -->`` line."""
    return re.findall(rf"<!-- test: {tag} -->\n```\w*\n(.*?)```", README, flags=re.S)


def repo_copy(dest: Path) -> Path:
    """The files git would give a fresh clone (tracked and untracked-not-ignored), copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")  # fmt: skip
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_readme_has_the_tested_blocks() -> None:
    assert len(blocks("quick")) >= 2 and len(blocks("load-model")) == 1


def test_quick_blocks_run_as_written(tmp_path: Path) -> None:
    repo = repo_copy(tmp_path / "visrl")
    for block in blocks("quick"):
        for line in filter(None, (ln.split("#")[0].strip() for ln in block.splitlines())):
            result = subprocess.run(line, shell=True, cwd=repo, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"README line failed: {line}\n{result.stderr[-3000:]}"
    summary = repo / "outputs" / "debug-fast" / "summary.json"
    assert summary.is_file(), "README: `python run.py debug=fast` lands in outputs/debug-fast/"


def test_load_model_block_runs_on_a_lora_saved_checkpoint(
    real_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from visrl.models.backbone import apply_lora
    from visrl.models.real import load_pretrained

    backbone = apply_lora(load_pretrained("Qwen/Qwen2-VL-7B-Instruct", path=real_checkpoints["qwen2vl"],
                                          family="qwen2vl", dtype="float32"))  # fmt: skip
    with torch.no_grad():  # a non-zero adapter, as after step-DPO
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    saved = tmp_path / "iter_3" / "model"
    backbone.save(saved)
    assert (saved / "adapter" / "adapter_config.json").is_file()
    (code,) = blocks("load-model")
    code, n = re.subn(r'model_dir = Path\(".*?"\)', f"model_dir = Path({str(saved)!r})", code)
    assert n == 1, "the README block names its model directory in one `model_dir = Path(...)` line"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "box:" in result.stdout and "answer:" in result.stdout

"""V* Bench (Wu & Xie 2023, "V*: Guided Visual Search as a Core Mechanism in Multimodal LLMs"): 191
multiple-choice questions about small details of high-resolution images, in two categories
(``direct_attributes`` 115, ``relative_position`` 76). A test of the fine-grained perception VisRL's
focus-then-answer format targets (paper §1, §4). Data: HF ``craigwu/vstar_bench``; layout::

    root/direct_attributes/X.jpg + X.json     root/relative_position/Y.jpg + Y.json
    X.json = {"target_object": [...], "bbox": [[x, y, w, h], ...], "question": str, "options": [...]}

``options[0]`` is the correct answer. Two protocols (``protocols`` picks either or both):

* ``likelihood`` — the original metric (``vstar_bench_eval.py`` of penghao-wu/vstar): prompt
  ``"<image>\\n" + question``, each option scored as the assistant's reply by its MEAN token
  cross-entropy (``completion_logprobs(..., reduction="mean")``, end-of-turn token included as in the
  original conversation template); the option with the lowest loss is chosen (first one on ties, as
  ``argmin``), correct iff it is option 0. (The original first runs the SEAL visual search; we score the
  policy alone.)
* ``generation`` — the lmms-eval variant (``tasks/vstar_bench``): the question, then the options as
  ``"A. ..."`` lines, then ``"\\nAnswer with the option's letter from the given choices directly."``; greedy,
  at most 16 new tokens; the letter is extracted with regex rules (:func:`extract_letter`, our wording of
  lmms-eval's ``extract_answer_letter``, restricted to the letters shown). Departure: lmms-eval ships the
  options pre-lettered; from the raw files we shuffle them per question with a seeded RNG
  (``shuffle_options``, seed ``f"{seed}:{uid}"``) so the correct letter is not always "A".

Accuracy per category and overall (micro mean over all questions), as both sources report.
``prompt_style="templates"`` uses ``templates.direct`` (the layout the policy was trained with) instead of
the published ``"<image>\\n{question}"``.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from visrl.benchmarks.base import (
    Predictions,
    read_predictions,
    scored_rows,
    skip_row,
    skipped_counts,
    write_metrics,
)
from visrl.benchmarks.effects import paired_bootstrap
from visrl.data.errors import InputError
from visrl.data.images import open_rgb, to_view
from visrl.data.prompts import Prompt, PromptTemplates, user
from visrl.models.protocols import Policy
from visrl.progress import progress

__all__ = [
    "CATEGORIES",
    "POST_PROMPT",
    "VStarBenchmark",
    "VStarItem",
    "extract_letter",
    "load_vstar",
    "load_vstar_rows",
]

CATEGORIES = ("direct_attributes", "relative_position")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
PUBLISHED_TEMPLATE = "<image>\n{question}"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LETTERS = "ABCDEFGH"
PROTOCOLS = ("likelihood", "generation")


@dataclass(frozen=True)
class VStarItem:
    """One V* question; ``options[0]`` is the correct answer."""

    uid: str  # "<category>/<stem>"
    category: str
    image_path: Path
    question: str
    options: tuple[str, ...]


class MissingImageError(InputError):
    """A V* annotation without its image beside it."""


def _read_item(json_path: Path, category: str) -> VStarItem:
    """One annotation; an unusable one is an InputError naming the file and the field."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decoding errors
        raise InputError(f"{json_path}: cannot read V* annotation: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{json_path}: expected a JSON object, got {type(data).__name__}")
    question, options = data.get("question"), data.get("options")
    if not isinstance(question, str) or not question:
        raise InputError(f"{json_path}: field 'question' must be a non-empty string")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        raise InputError(f"{json_path}: field 'options' must be a list of 2..{len(LETTERS)} strings")
    if not all(isinstance(o, str) for o in options):
        raise InputError(f"{json_path}: field 'options' holds a non-string entry")
    images = [json_path.with_suffix(s) for s in IMAGE_SUFFIXES if json_path.with_suffix(s).is_file()]
    if not images:
        raise MissingImageError(
            f"{json_path}: no image {json_path.stem}{{{','.join(IMAGE_SUFFIXES)}}} beside it"
        )
    return VStarItem(f"{category}/{json_path.stem}", category, images[0], question, tuple(options))


def _annotation_files(
    root: Path | str, categories: Sequence[str], limit: int | None
) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    for category in categories:
        folder = Path(root) / category
        if not folder.is_dir():
            raise InputError(f"V* root {root}: missing folder {category}/ (see docs/benchmarks.md)")
        found = sorted(folder.glob("*.json"))
        if not found:
            raise InputError(f"V* root {root}: no *.json annotations in {folder}")
        files += [(p, category) for p in found[:limit]]
    return files


def load_vstar(
    root: Path | str, categories: Sequence[str] = CATEGORIES, limit: int | None = None
) -> list[VStarItem]:
    """The V* questions under ``root`` (sorted by file name within each category, ``limit`` per category);
    the first unusable annotation raises its InputError."""
    return [_read_item(p, c) for p, c in _annotation_files(root, categories, limit)]


def load_vstar_rows(
    root: Path | str, categories: Sequence[str] = CATEGORIES, limit: int | None = None
) -> tuple[list[VStarItem], list[dict]]:
    """:func:`load_vstar` for evaluation: usable items, and a skipped row for each other annotation."""
    items, skipped = [], []
    for path, category in _annotation_files(root, categories, limit):
        try:
            items.append(_read_item(path, category))
        except InputError as e:
            reason = "image_missing" if isinstance(e, MissingImageError) else "bad_record"
            skipped.append(skip_row(f"{category}/{path.stem}", reason, path, None, str(e),
                                    protocol="skipped", category=category))  # fmt: skip
    return items, skipped


def _open(item: VStarItem, size: int | None) -> Image.Image | dict:
    """The item's view, or its skipped row when the image cannot be read."""
    try:
        return to_view(open_rgb(item.image_path), size)
    except FileNotFoundError as e:
        return skip_row(item.uid, "image_unreadable", item.image_path, None, str(e),
                        protocol="skipped", category=item.category)  # fmt: skip


def option_order(uid: str, n: int, seed: int, shuffle: bool) -> list[int]:
    """The order the options are shown in (indices into ``options``), deterministic per question."""
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{uid}").shuffle(order)  # str seeds hash with SHA-512: stable across runs
    return order


def lettered_question(question: str, options: Sequence[str]) -> str:
    """lmms-eval's text: question, ``"A. opt"`` lines, the post-prompt."""
    lines = [f"{LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(options)]
    return f"{question.strip()}\n" + "\n".join(lines) + POST_PROMPT


def extract_letter(response: str, n_options: int) -> str | None:
    """The option letter a free-form reply names, or None. Rules, first match wins (case-insensitive):
    a leading letter (``"B"``, ``"B."``, ``"(B)"``); ``answer/option/choice (is) X``; ``(X)``; ``X.``/``X)``;
    a standalone letter; only letters of the shown options (``A..``) count."""
    valid = LETTERS[:n_options]
    text = response.strip().upper()
    cls = f"[{valid}]"
    patterns = (
        rf"^\(?({cls})(?![A-Z])",
        rf"(?:ANSWER|OPTION|CHOICE)(?:\s+IS)?[\s:]+\(?({cls})(?![A-Z])",
        rf"\(({cls})\)",
        rf"(?<![A-Z])({cls})\s*[.)\]]",
        rf"(?:^|\s)({cls})(?:\s|$)",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


class VStarBenchmark:
    """V* Bench with the original likelihood protocol and/or the lmms-eval generation protocol."""

    name = "vstar"
    version = "vstar-1.0"

    def __init__(
        self,
        root: str | Path,
        protocols: Sequence[str] = PROTOCOLS,
        categories: Sequence[str] = CATEGORIES,
        limit: int | None = None,
        seed: int = 0,
        shuffle_options: bool = True,
        max_new_tokens: int = 16,
        batch_size: int = 8,
        prompt_style: str = "published",
    ):
        unknown = set(protocols) - set(PROTOCOLS) or set(categories) - set(CATEGORIES)
        if unknown or not protocols:
            raise ValueError(
                f"vstar: protocols must be a non-empty subset of {PROTOCOLS} and categories of "
                f"{CATEGORIES}; got {list(protocols)}, {list(categories)}"
            )
        if prompt_style not in ("published", "templates"):
            raise ValueError(f"vstar: prompt_style must be 'published' or 'templates', got {prompt_style!r}")
        self.root, self.protocols, self.categories = Path(root), tuple(protocols), tuple(categories)
        self.limit, self.seed, self.shuffle_options = limit, seed, shuffle_options
        self.max_new_tokens, self.batch_size, self.prompt_style = max_new_tokens, batch_size, prompt_style

    def _prompt(self, templates: PromptTemplates, text: str, image: Image.Image) -> Prompt:
        if self.prompt_style == "templates":
            return templates.direct_prompt(text, image)
        return [user(PUBLISHED_TEMPLATE, [image], question=text)]

    def _likelihood(
        self, policy: Policy, templates: PromptTemplates, chunk: list[tuple[VStarItem, Image.Image]]
    ) -> list[dict]:
        prompts: list[Prompt] = []
        completions: list[str] = []
        for item, image in chunk:  # every option of every question in one call
            prompts += [self._prompt(templates, item.question, image)] * len(item.options)
            completions += list(item.options)
        flat = policy.completion_logprobs(
            prompts, completions, reduction="mean"
        ).tolist()  # [sum of n_options]
        rows, offset = [], 0
        for item, _ in chunk:
            scores = flat[offset : offset + len(item.options)]
            offset += len(item.options)
            choice = max(range(len(scores)), key=lambda i: (scores[i], -i))  # = argmin loss, first on ties
            rows.append({"choice": choice, "pred": item.options[choice], "scores": scores})
        return rows

    def _generation(
        self, policy: Policy, templates: PromptTemplates, chunk: list[tuple[VStarItem, Image.Image]]
    ) -> list[dict]:
        orders = [option_order(it.uid, len(it.options), self.seed, self.shuffle_options) for it, _ in chunk]
        texts = [
            lettered_question(it.question, [it.options[j] for j in o]) for (it, _), o in zip(chunk, orders)
        ]
        prompts = [self._prompt(templates, t, im) for (_, im), t in zip(chunk, texts)]
        outs = policy.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.0)
        rows = []
        for (item, _), order, out in zip(chunk, orders, outs):
            letter = extract_letter(out[0], len(item.options))
            choice = order[LETTERS.index(letter)] if letter else None
            gold = LETTERS[order.index(0)]
            rows.append(
                {"choice": choice, "pred": out[0], "letter": letter, "shown": order, "gold_letter": gold}
            )
        return rows

    def _chunk_rows(self, policy: Policy, templates: PromptTemplates, items: list[VStarItem]) -> list[dict]:
        """Rows of every protocol for ``items`` (skipped rows for unreadable images)."""
        size = getattr(getattr(policy, "backbone", None), "image_size", None)
        opened = [(it, _open(it, size)) for it in items]
        rows = [o for _, o in opened if isinstance(o, dict)]
        chunk = [(it, o) for it, o in opened if not isinstance(o, dict)]
        if not chunk:
            return rows
        results: dict[str, list[dict]] = {}
        if "likelihood" in self.protocols:
            results["likelihood"] = self._likelihood(policy, templates, chunk)
        if "generation" in self.protocols:
            results["generation"] = self._generation(policy, templates, chunk)
        for protocol, outs in results.items():
            for (item, _), out in zip(chunk, outs):
                head = {"uid": item.uid, "protocol": protocol, "category": item.category}
                rows.append({**head, "question": item.question, "options": list(item.options), **out,
                             "correct": out["choice"] == 0})  # fmt: skip
        return rows

    def evaluate(self, policy: Policy, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        """Score every question with each protocol; predictions.jsonl is appended chunk by chunk (a
        resumed evaluation does only the rest), then metrics.json is written."""
        items, skipped = load_vstar_rows(self.root, self.categories, self.limit)
        preds = Predictions(Path(out_dir) / "predictions.jsonl", key=lambda r: (r["uid"], r["protocol"]))
        preds.add(skipped)
        todo = [it for it in items if any((it.uid, p) not in preds.done for p in self.protocols)]
        with progress("eval | vstar", total=len(todo), unit="q") as bar:
            for start in range(0, len(todo), self.batch_size):
                preds.add(self._chunk_rows(policy, templates, todo[start : start + self.batch_size]))
                bar.advance(len(todo[start : start + self.batch_size]))
        wanted = {it.uid for it in items} | {r["uid"] for r in skipped}
        rows = [r for r in preds.rows if r["uid"] in wanted and r["protocol"] in (*self.protocols, "skipped")]
        if not scored_rows(rows):
            raise InputError(f"V* root {self.root}: nothing scorable ({len(rows)} questions skipped)")
        metrics = self.aggregate(scored_rows(rows))
        if len(scored_rows(rows)) < len(rows):
            metrics.update(skipped_counts(rows))
        write_metrics(Path(out_dir), metrics)
        return metrics

    @property
    def headline(self) -> str:
        """The first configured protocol's overall accuracy (``likelihood/accuracy`` by default)."""
        return f"{self.protocols[0]}/accuracy"

    def paired_effect(self, before: Path, after: Path, n: int = 2000, seed: int = 0) -> dict[str, dict]:
        """Paired bootstrap of (after - before) of ``<protocol>/accuracy`` for each protocol."""
        out = {}
        for protocol in self.protocols:
            b, a = (
                {r["uid"]: float(r["correct"]) for r in read_predictions(d) if r["protocol"] == protocol}
                for d in (before, after)
            )
            out[f"{protocol}/accuracy"] = paired_bootstrap(b, a, n, seed)
        return out

    def aggregate(self, rows: Sequence[dict]) -> dict[str, float]:
        """``{protocol}/accuracy`` (micro over all questions), ``{protocol}/{category}/accuracy``, counts,
        and ``generation/letter_rate`` (share of replies with an extractable letter)."""
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in rows:
            groups[(r["protocol"], r["category"])].append(r)
            groups[(r["protocol"], "overall")].append(r)
        metrics: dict[str, float] = {}
        for (protocol, category), rs in sorted(groups.items()):
            key = protocol if category == "overall" else f"{protocol}/{category}"
            metrics[f"{key}/accuracy"] = sum(r["correct"] for r in rs) / len(rs)
            metrics[f"{key}/n"] = float(len(rs))
            if protocol == "generation" and category == "overall":
                metrics["generation/letter_rate"] = sum(r["letter"] is not None for r in rs) / len(rs)
        return metrics

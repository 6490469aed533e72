"""V* Bench: both protocols on a fixture in the published layout, with a fake policy whose log-probs and
generations are crafted so the expected accuracies are known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from visrl.benchmarks.vstar import POST_PROMPT, VStarBenchmark, extract_letter, load_vstar, option_order
from visrl.data.errors import InputError
from visrl.data.prompts import REFERENCE, PromptTemplates

torch.set_num_threads(1)

# question -> (options, index of the option the fake prefers under each protocol)
# likelihood: da0 right, da1 wrong, da2 tie of 0 and 1 (argmin keeps the first: right), rp0 wrong, rp1 right
# generation: da0 right, da1 wrong, da2 no letter, rp0 right, rp1 wrong
ITEMS = {
    "direct_attributes": {
        "da0": ("What is the colour of the cup?", ["red", "blue", "green", "white"], 0, "right"),
        "da1": ("What is the material of the bag?", ["leather", "cloth", "paper", "plastic"], 2, "wrong"),
        "da2": ("What is the colour of the hat?", ["black", "yellow", "pink", "grey"], "tie", "none"),
    },
    "relative_position": {
        "rp0": ("Is the dog on the left or right of the car?", ["left", "right"], 1, "right"),
        "rp1": ("Is the lamp above or below the clock?", ["above", "below"], 0, "wrong"),
    },
}
BY_QUESTION = {q: (opts, lik, gen) for cat in ITEMS.values() for q, opts, lik, gen in cat.values()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for category, items in ITEMS.items():
        (tmp_path / category).mkdir()
        for stem, (question, options, _, _) in items.items():
            Image.new("RGB", (48, 32), (len(stem), 80, 160)).save(tmp_path / category / f"{stem}.jpg")
            ann = {
                "target_object": ["thing"],
                "bbox": [[1, 2, 10, 12]],
                "question": question,
                "options": options,
            }
            (tmp_path / category / f"{stem}.json").write_text(json.dumps(ann))
    return tmp_path


class CraftedPolicy:
    def __init__(self) -> None:
        self.generated: list = []
        self.scored: list = []

    def completion_logprobs(self, prompts, completions, reduction="sum"):
        assert reduction == "mean"  # the original picks the lowest MEAN token loss
        scores = []
        for prompt, option in zip(prompts, completions):
            text = prompt[0].text
            assert text.startswith("<image>\n") and prompt[0].images[0].size == (48, 32)
            options, preferred, _ = BY_QUESTION[text.removeprefix("<image>\n")]
            best = {0, 1} if preferred == "tie" else {preferred}
            scores.append(-0.5 if options.index(option) in best else -2.0 - options.index(option))
            self.scored.append((text, option))
        return torch.tensor(scores)

    def generate(self, prompts, max_new_tokens, temperature=0.0, num_return_sequences=1, seed=None):
        assert max_new_tokens == 16 and temperature == 0.0
        out = []
        for prompt in prompts:
            text = prompt[0].text
            assert text.startswith("<image>\n") and text.endswith(POST_PROMPT)
            question, *lines = text.removeprefix("<image>\n").removesuffix(POST_PROMPT).split("\n")
            shown = dict(re.fullmatch(r"([A-D])\. (.*)", line).groups() for line in lines)  # letter -> option
            options, _, mode = BY_QUESTION[question]
            assert sorted(shown.values()) == sorted(options)
            right = next(k for k, v in shown.items() if v == options[0])
            wrong = next(k for k, v in shown.items() if v != options[0])
            out.append(
                [
                    {"right": f"{right}. {options[0]}", "wrong": f"The answer is ({wrong}).", "none": "Hmm"}[
                        mode
                    ]
                ]
            )
            self.generated.append(shown)
        return out


def test_both_protocols_give_the_crafted_accuracies(root: Path, tmp_path: Path) -> None:
    policy = CraftedPolicy()
    bench = VStarBenchmark(root=str(root), batch_size=2)
    metrics = bench.evaluate(policy, REFERENCE, tmp_path)
    assert metrics["likelihood/direct_attributes/accuracy"] == pytest.approx(2 / 3)
    assert metrics["likelihood/relative_position/accuracy"] == 0.5
    assert metrics["likelihood/accuracy"] == pytest.approx(3 / 5)  # micro over questions, not (2/3 + 1/2) / 2
    assert metrics["generation/direct_attributes/accuracy"] == pytest.approx(1 / 3)
    assert metrics["generation/relative_position/accuracy"] == 0.5
    assert metrics["generation/accuracy"] == pytest.approx(2 / 5)
    assert metrics["generation/letter_rate"] == pytest.approx(4 / 5)
    assert metrics["likelihood/n"] == 5 and metrics["generation/direct_attributes/n"] == 3
    assert len(policy.scored) == 3 * 4 + 2 * 2  # every option of every question scored once
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and json.loads((tmp_path / "metrics.json").read_text()) == metrics
    tie = next(r for r in rows if r["uid"] == "direct_attributes/da2" and r["protocol"] == "likelihood")
    assert tie["choice"] == 0 and tie["correct"] and tie["scores"][:2] == [-0.5, -0.5]
    none = next(r for r in rows if r["uid"] == "direct_attributes/da2" and r["protocol"] == "generation")
    assert none["letter"] is None and none["choice"] is None and not none["correct"]


def test_option_shuffle_is_seeded_and_moves_the_correct_letter(root: Path, tmp_path: Path) -> None:
    orders = [option_order(f"direct_attributes/q{i}", 4, seed=0, shuffle=True) for i in range(40)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert orders == [option_order(f"direct_attributes/q{i}", 4, seed=0, shuffle=True) for i in range(40)]
    gold_letters = {"ABCD"[o.index(0)] for o in orders}
    assert gold_letters == set("ABCD")  # the correct answer is not always "A"
    assert orders != [option_order(f"direct_attributes/q{i}", 4, seed=1, shuffle=True) for i in range(40)]
    assert option_order("x", 4, seed=0, shuffle=False) == [0, 1, 2, 3]
    policy = CraftedPolicy()
    VStarBenchmark(root, protocols=["generation"], shuffle_options=False).evaluate(
        policy, REFERENCE, tmp_path
    )
    assert all(list(shown.values()) == BY_QUESTION_OPTIONS[i] for i, shown in enumerate(policy.generated))


BY_QUESTION_OPTIONS = [opts for cat in ITEMS.values() for _, opts, _, _ in cat.values()]


@pytest.mark.parametrize(
    ("reply", "n", "letter"),
    [
        ("B", 4, "B"),
        ("(C)", 4, "C"),
        ("c. green", 4, "C"),
        ("A red car", 4, "A"),  # a leading letter counts, as in lmms-eval
        ("The answer is D.", 4, "D"),
        ("Answer: b", 4, "B"),
        ("The correct option is (B)", 4, "B"),
        ("I think it's C", 4, "C"),
        ("Both", 4, None),
        ("C", 2, None),  # only the letters shown
        ("D) white", 3, None),
        ("", 4, None),
        ("none of them", 4, None),
    ],
)
def test_extract_letter(reply: str, n: int, letter: str | None) -> None:
    assert extract_letter(reply, n) == letter


def test_templates_prompt_style(root: Path, tmp_path: Path) -> None:
    class QuestionFirst(CraftedPolicy):
        def completion_logprobs(self, prompts, completions, reduction="sum"):
            for p in prompts:  # the policy's own layout: question first, then the image
                text, image = p[0].parts
                assert text.startswith("Q: ") and text.endswith("?\n") and isinstance(image, Image.Image)
            return torch.zeros(len(prompts))  # all tied: argmin keeps option 0

    templates = PromptTemplates(box="{question}", answer="{question}", direct="Q: {question}\n<image>")
    bench = VStarBenchmark(
        root, protocols=["likelihood"], categories=["relative_position"], prompt_style="templates"
    )
    metrics = bench.evaluate(QuestionFirst(), templates, tmp_path)
    assert metrics == {"likelihood/accuracy": 1.0, "likelihood/n": 2.0, "likelihood/relative_position/accuracy": 1.0,
                       "likelihood/relative_position/n": 2.0}  # fmt: skip


def test_bad_input_names_the_file(root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing folder direct_attributes/"):
        load_vstar(tmp_path / "nowhere")
    (root / "relative_position" / "rp1.json").write_text(json.dumps({"question": "Q?", "options": "left"}))
    with pytest.raises(ValueError, match=r"rp1.json: field 'options'"):
        load_vstar(root)
    (root / "relative_position" / "rp1.json").write_text(json.dumps({"options": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"rp1.json: field 'question'"):
        load_vstar(root)
    (root / "relative_position" / "rp1.jpg").unlink()
    (root / "relative_position" / "rp1.json").write_text(
        json.dumps({"question": "Q?", "options": ["a", "b"]})
    )
    with pytest.raises(InputError, match="rp1.json: no image rp1"):
        load_vstar(root)
    assert len(load_vstar(root, ["direct_attributes"], limit=2)) == 2
    with pytest.raises(ValueError, match="protocols must be"):
        VStarBenchmark(root, protocols=["vote"])


def test_runs_end_to_end_with_a_real_tiny_policy(root: Path, tmp_path: Path) -> None:
    """Both protocols run with a real tiny backbone: scores are mean log-probs, replies are decoded text."""
    from visrl.data.box_formats import GridFormat
    from visrl.models.policy import VLMPolicy
    from visrl.models.tiny import build_tiny

    policy = VLMPolicy(build_tiny("qwen2vl", box_format=GridFormat(4), seed=0), batch_size=8)
    metrics = VStarBenchmark(root, max_new_tokens=4).evaluate(policy, REFERENCE, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    likelihood = [r for r in rows if r["protocol"] == "likelihood"]
    assert len(likelihood) == 5 and all(len(r["scores"]) == len(r["options"]) for r in likelihood)
    assert all(s < 0 for r in likelihood for s in r["scores"])  # mean log-probs of real tokens
    expected = sum(max(range(len(r["scores"])), key=r["scores"].__getitem__) == 0 for r in likelihood) / 5
    assert metrics["likelihood/accuracy"] == pytest.approx(expected)
    assert 0 <= metrics["generation/letter_rate"] <= 1 and metrics["generation/n"] == 5

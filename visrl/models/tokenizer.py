"""A tiny byte-level BPE tokenizer and a Qwen-style chat template, built offline in well under a second.

Why: the tiny backbones (``visrl.models.tiny``) are real Hugging Face VLM classes trained from random
weights on the synthetic zoom world, so they need a tokenizer that exists without any hub download. A
~512-token byte-level BPE trained on a small built-in corpus (the VisRL prompt wording of paper §3 /
Visual-CoT, judge wording, colour/shape words, numbers and box strings) keeps sequences short while never
producing an unknown token (the byte alphabet covers everything).

Digits are split before the byte-level step, so every digit is exactly one token: the tiny box format
(``GridFormat``) writes "[1, 2, 2, 3]" and each coordinate must be a single decision of the model.

The chat template is Qwen's ``<|im_start|>role\\n...<|im_end|>\\n`` layout (role tokens measurably help
a from-scratch model separate the two VisRL steps, measured on the synthetic world). Image parts are
rendered per family (:func:`chat_template`), and assistant turns sit in ``{% generation %}`` blocks so
``return_assistant_tokens_mask=True`` works.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from visrl.data.prompts import REFERENCE, VISRL_SUFFIX

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
QWEN_IMAGE_TOKEN = "<|image_pad|>"
LLAVA_IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, VISION_START, VISION_END, QWEN_IMAGE_TOKEN, LLAVA_IMAGE_TOKEN)

QWEN_IMAGE_PLACEHOLDER = VISION_START + QWEN_IMAGE_TOKEN + VISION_END

_COLOURS = "red green blue yellow purple orange cyan white black grey gray pink brown magenta"
_SHAPES = "circle square triangle diamond star cross plus ring bar dot symbol object shape rectangle heart"
_PATTERNS = "horizontal vertical diagonal checkered striped dotted plain"
_WORDS = (
    "what which where is the of colour color shape left right top bottom above below next to near inside "
    "outside small large big tiny answer question image region box crop sub-image bounding coordinate "
    "yes no none there how many count a an in on at with and or this that it its one two three four"
)
_PROMPTS = (
    REFERENCE.box,
    REFERENCE.answer,
    REFERENCE.direct,
    VISRL_SUFFIX,
    "Please provide the bounding box coordinate of the region that can help you answer the question better.",
    "Answer the question using a single word or phrase.",
    "Grade the model's answer against the standard answer for this question and image, from 0 to 1. "
    'Reply only with JSON like {"score": 0.8}.',
    "Judge whether this image contains the information of the standard answer for the question, from 0 to 1.",
    "Question: What is the colour of the star? Standard answer: red. Model answer: blue.",
    "What symbol is on the blue circle? What colour is the object left of the triangle?",
)


def _builtin_corpus() -> list[str]:
    """The fixed training text; its order is part of the tokenizer's identity (determinism)."""
    lines: list[str] = list(_PROMPTS)
    lines += [f"{IM_START}user\nWhere?{IM_END}\n{IM_START}assistant\n"] * 50  # role words: one token each
    for words in (_COLOURS, _SHAPES, _PATTERNS, _WORDS):
        lines.append(words)
        lines.append(" ".join(w.capitalize() for w in words.split()))
    # answer words are frequent, so they merge into whole tokens as in a real vocabulary; a multi-token
    # answer sharing pieces with others ("ver"+"tic"+...) lets answer-step DPO splice them into garbage
    lines += f"{_COLOURS} {_SHAPES} {_PATTERNS}".split() * 40  # one word per line: the bare form, as answered
    for colour in _COLOURS.split():
        for shape in _SHAPES.split():
            lines.append(f"What is on the {colour} {shape}? The {colour} {shape}.")
    lines.append(" ".join(str(i) for i in range(1001)))
    lines.append(" ".join(f"{i / 1000:.3f}" for i in range(0, 1001, 7)))
    for a in range(5):
        for b in range(5):
            lines.append(f"[{a}, {b}, {min(a + 1, 4)}, {min(b + 2, 4)}] ({a},{b}),({a + 1},{b + 1})")
    lines.append('{"bbox_2d": [12, 40, 220, 198]} {"score": 0.8} {"score": 1.0} {"score": 0}')
    lines.append("[0.123, 0.456, 0.789, 0.900] . , ; : ! ? ' \" ( ) [ ] { } - + * / = % # @ & _ < > |")
    return lines


def chat_template(image_placeholder: str = QWEN_IMAGE_PLACEHOLDER) -> str:
    """Qwen-style Jinja chat template rendering each ``{"type": "image"}`` part as ``image_placeholder``.

    Assistant turns are wrapped in ``{% generation %}`` (their text and the closing ``<|im_end|>``), so
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the trained tokens.
    """
    image = image_placeholder.replace("'", "\\'")
    return (
        "{%- for message in messages -%}"
        "{%- set ns = namespace(text='') -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '" + image + "' -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '" + IM_START + "' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- ns.text + '" + IM_END + "' -}}{%- endgeneration -%}"
        "{%- else -%}{{- ns.text + '" + IM_END + "' -}}{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
    )


def build_tiny_tokenizer(
    extra_corpus: Iterable[str] = (),
    vocab_size: int = 512,
    image_token: str = QWEN_IMAGE_TOKEN,
    image_placeholder: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE (deterministic: same corpus -> same vocabulary) and wrap it.

    Args:
        extra_corpus: more training lines (e.g. dataset questions), appended after the built-in corpus.
        vocab_size: target size including the 256 byte symbols and the special tokens.
        image_token: the token the processor expands per image patch group (``<|image_pad|>`` for the
            Qwen families, ``<image>`` for LLaVA); exposed as ``tokenizer.image_token(_id)``.
        image_placeholder: how the chat template renders an image part; defaults to the Qwen
            ``<|vision_start|><|image_pad|><|vision_end|>`` or to ``image_token`` when that is not Qwen's.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"build_tiny_tokenizer: vocab_size={vocab_size} is below the byte alphabet (256 + specials)"
        )
    if image_token not in SPECIAL_TOKENS:
        raise ValueError(f"build_tiny_tokenizer: image_token {image_token!r} is not one of {SPECIAL_TOKENS}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([*_builtin_corpus(), *extra_corpus], trainer=trainer)
    if image_placeholder is None:
        image_placeholder = QWEN_IMAGE_PLACEHOLDER if image_token == QWEN_IMAGE_TOKEN else image_token
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens={"image_token": image_token},
        chat_template=chat_template(image_placeholder),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )

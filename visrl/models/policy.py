"""VLMPolicy: batched sampling and completion log-probs of a backbone, for rollouts, scorers and evaluation.

Why: VisRL's self-evolution loop (paper §3) samples K boxes per question at a high temperature, answers
from each crop, scores candidates (partly by likelihood), and evaluates the policy greedily. All of it is
"generate text for many prompts" or "log-prob of these completions", done here once: prompts are encoded
by the backbone's encoder, left-padded into batches, decoded with a KV cache, and the returned texts are
cut at the end-of-turn token. Sampling is reproducible with ``seed`` without touching the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from visrl.models.backbone import Backbone
from visrl.models.logprobs import sequence_logps
from visrl.prompts import Prompt


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class VLMPolicy:
    """Generation and scoring front-end of a :class:`Backbone`.

    ``batch_size`` bounds the number of sequences per forward pass (prompts × return sequences when
    generating, prompt+completion rows when scoring).
    """

    def __init__(self, backbone: Backbone, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"VLMPolicy: batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.batch_size = batch_size

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()
        }

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        num_return_sequences: int = 1,
        seed: int | None = None,
    ) -> list[list[str]]:
        """For each prompt, ``num_return_sequences`` completions (greedy when ``temperature`` is 0).

        Sampling draws from the full distribution (top-k and top-p off), as the reference's API sampling.
        """
        if temperature < 0:
            raise ValueError(f"VLMPolicy.generate: temperature must be >= 0, got {temperature}")
        if temperature == 0 and num_return_sequences > 1:
            raise ValueError("VLMPolicy.generate: greedy decoding with num_return_sequences > 1 gives copies")
        enc = self.backbone.encoder
        per_chunk = max(1, self.batch_size // num_return_sequences)
        sample = temperature > 0
        options = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            num_return_sequences=num_return_sequences,
            eos_token_id=enc.stop_token_ids,
            pad_token_id=enc.pad_token_id,
            use_cache=True,
            repetition_penalty=1.0,  # checkpoints' generation configs may set one; rollouts sample the model as is
        )
        if sample:
            options.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        out: list[list[str]] = []
        with eval_mode(self.model), torch.random.fork_rng(devices=self._rng_devices()):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), per_chunk):
                encoded = [enc.encode_prompt(p) for p in prompts[start : start + per_chunk]]
                batch = self._to_device(enc.collate(encoded, None, padding_side="left"))
                seqs = self.model.generate(**batch, **options)  # [n * R, T + new]
                new = seqs[:, batch["input_ids"].shape[1] :].cpu()
                texts = [enc.decode(row) for row in new]
                out.extend(
                    texts[i : i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)
                )
        return out

    def _rng_devices(self) -> list[int]:
        dev = self.device
        return [dev.index or 0] if dev.type == "cuda" else []

    @torch.no_grad()
    def completion_logprobs(
        self, prompts: Sequence[Prompt], completions: Sequence[str], reduction: str = "sum"
    ) -> Tensor:
        """log π(completion + end-of-turn | prompt) per pair, [n] fp32 on CPU; ``reduction`` sum or mean."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"completion_logprobs: {len(prompts)} prompts but {len(completions)} completions"
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"completion_logprobs: reduction must be 'sum' or 'mean', got {reduction!r}")
        enc = self.backbone.encoder
        results: list[Tensor] = []
        with eval_mode(self.model):
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                encoded = [enc.encode_prompt(p) for p in prompts[start:stop]]
                ids = [enc.encode_completion(c) for c in completions[start:stop]]
                batch = self._to_device(enc.collate(encoded, ids, padding_side="right"))
                sums, counts = sequence_logps(self.model, batch)
                results.append((sums / counts.clamp(min=1) if reduction == "mean" else sums).float().cpu())
        return torch.cat(results) if results else torch.zeros(0)

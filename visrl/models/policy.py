"""VLMPolicy: batched sampling and completion log-probs of a backbone, for rollouts, scorers and evaluation.

Why: VisRL's self-evolution loop (paper §3) samples K boxes per question at a high temperature, answers
from each crop, scores candidates (partly by likelihood), and evaluates the policy greedily. All of it is
"generate text for many prompts" or "log-prob of these completions", done here once: prompts are encoded
by the backbone's encoder, left-padded into batches, decoded with a KV cache, and the returned texts are
cut at the end-of-turn token. Sampling is reproducible with ``seed`` without touching the global RNG.

Two shortcuts remove the work a rollout chunk would otherwise repeat (``experiments/perf/rollout_speed.py``):

* **Vision features once per image.** The vision tower runs once per distinct image object of a call
  (the full view is shared by the K answer prompts of a question) and the features reach the model as
  ``mm_encoder_outputs`` instead of ``pixel_values``. Inside :meth:`VLMPolicy.vision_cache` they are kept
  across calls too (step-1 views reused in step 2, crops reused by the likelihood crop scorer).
* **Shared prefixes prefilled once** (:mod:`visrl.models.prefix`). The K samples of a step-1 prompt, and
  the K step-2 prompts of a question up to their crop, share a prefix: it is prefilled once, its KV cache
  is copied to each row, and ``generate`` continues from that cache (Hugging Face would prefill K copies).
  Position ids are Hugging Face's own for the padded layout, so every row sees its unpadded sequence. The
  copied cache is preallocated for the whole generation (a ``StaticCache``): each new token is written in
  place, where the default dynamic cache copies every row's whole cache at every step.

Neither changes the rows of a batch, their order, or the sampling calls (one multinomial over all rows
per step), so a seed gives the same random stream; outputs equal the plain path's up to float rounding of
a differently grouped computation (the tests compare both, greedy and seeded sampling, on all families;
rollout files come out byte-identical). ``precompute_vision`` / ``share_prefixes`` switch them off.
Generation and scoring run under ``torch.inference_mode`` (no autograd bookkeeping on the many small
decode-step ops); ``completion_logprobs`` returns an ordinary tensor.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import Cache, DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visrl.data.prompts import Prompt
from visrl.models.backbone import Backbone
from visrl.models.encoding import EncodedPrompt
from visrl.models.logprobs import sequence_logps
from visrl.models.prefix import Group, identities, image_spans, shared_layout, shared_prefix_groups


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def prompt_images(prompt: Prompt) -> list[Image.Image]:
    """The images of a prompt in placeholder order."""
    return [im for message in prompt for im in message.images]


def _without_pixels(encoded: EncodedPrompt) -> EncodedPrompt:
    """The prompt without ``pixel_values`` (its features are passed precomputed); grids stay."""
    vision = {k: v for k, v in encoded.vision.items() if k != "pixel_values"}
    return dataclasses.replace(encoded, vision=vision)


class VLMPolicy:
    """Generation and scoring front-end of a :class:`Backbone`.

    ``batch_size`` bounds the number of sequences per forward pass (prompts × return sequences when
    generating, prompt+completion rows when scoring) and the images per vision-tower call.
    ``feature_cache_bytes`` bounds the vision features kept by :meth:`vision_cache` (least recently used
    go first; a miss only recomputes).
    """

    def __init__(self, backbone: Backbone, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"VLMPolicy: batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.batch_size = batch_size
        self.precompute_vision = True  # False: pixel_values to the model, the vision tower per row
        self.share_prefixes = True  # False: Hugging Face prefills every row (and return sequence)
        self.feature_cache_bytes = 2 << 30
        self._features: OrderedDict[int, tuple[Image.Image, Tensor]] = OrderedDict()
        self._feature_bytes = 0
        self._cache_depth = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dtype = next(self.model.parameters()).dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None)
            if isinstance(v, Tensor)
            else v
            for k, v in batch.items()
        }

    # ---- vision features --------------------------------------------------------------------------------
    @contextmanager
    def vision_cache(self) -> Iterator[None]:
        """Within the block, each distinct image object's vision features are computed once, across calls.

        The weights (and adapter state) must not change inside the block: features are not recomputed.
        Re-entrant; leaving the outermost block frees them. Every ``generate`` / ``completion_logprobs``
        call opens one, so an image repeated within one call is always encoded once.
        """
        self._cache_depth += 1
        try:
            yield
        finally:
            self._cache_depth -= 1
            if self._cache_depth == 0:
                self._features.clear()
                self._feature_bytes = 0

    def _uses_features(self) -> bool:
        """Precomputed ``mm_encoder_outputs``: switched on and accepted by the model's forward."""
        forward = self.backbone.base_model.forward
        return self.precompute_vision and "mm_encoder_outputs" in inspect.signature(forward).parameters

    def _shares_prefixes(self) -> bool:
        """Switched on, and the attention takes any 2-D mask (the shared layout pads between prefix and
        suffix): eager or SDPA; flash-attention paths are only known to handle left/right padding."""
        impl = getattr(self.backbone.base_model.config, "_attn_implementation", None) or "eager"
        return self.share_prefixes and impl in ("eager", "sdpa")

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """Vision-tower output per image ([n_tokens_i, D] each, model dtype and device), computed once per
        distinct image object in batches of ``batch_size`` images, in eval mode."""
        found = {id(im): hit[1] for im in images if (hit := self._features.get(id(im))) is not None}
        missing = list({id(im): im for im in images if id(im) not in found}.values())
        enc = self.backbone.encoder
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            pixels = [enc.image_features(im)[0] for im in chunk]  # per image: pixel_values (+ grid_thw)
            inputs = self._to_device({k: torch.cat([p[k] for p in pixels]) for k in pixels[0]})
            with eval_mode(self.model):
                out = self.backbone.base_model.get_image_features(**inputs, return_dict=True).pooler_output
            if len(out) != len(chunk):
                raise RuntimeError(
                    f"VLMPolicy: the vision tower gave {len(out)} outputs for {len(chunk)} images"
                )
            for im, feats in zip(chunk, out):
                found[id(im)] = feats
                self._remember(im, feats)
        for im in images:
            if id(im) in self._features:
                self._features.move_to_end(id(im))
        return [found[id(im)] for im in images]

    def _remember(self, image: Image.Image, feats: Tensor) -> None:
        """Keep ``feats`` while a cache block is open (the image stays alive, so its id stays unique)."""
        if self._cache_depth == 0:
            return
        self._features[id(image)] = (image, feats)
        self._feature_bytes += feats.numel() * feats.element_size()
        while len(self._features) > 1 and self._feature_bytes > self.feature_cache_bytes:
            old = self._features.popitem(last=False)[1][1]
            self._feature_bytes -= old.numel() * old.element_size()

    def _mm_outputs(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """``mm_encoder_outputs`` for placeholder-ordered ``images`` (nothing when there are none)."""
        if not images:
            return {}
        features = BaseModelOutputWithPooling(pooler_output=self.image_features(images))
        return {"mm_encoder_outputs": {"image": features}}

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.inference_mode()
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
        copies = num_return_sequences
        per_chunk = max(1, self.batch_size // copies)
        options = self._options(max_new_tokens, temperature)
        out: list[list[str]] = []
        with eval_mode(self.model), torch.random.fork_rng(devices=self._rng_devices()), self.vision_cache():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), per_chunk):
                new = self._generate_batch(list(prompts[start : start + per_chunk]), copies, options)
                texts = [enc.decode(row) for row in new.cpu()]  # rows prompt-major: [n * copies, new]
                out.extend(texts[i : i + copies] for i in range(0, len(texts), copies))
        return out

    def _options(self, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        enc = self.backbone.encoder
        options: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            eos_token_id=enc.stop_token_ids,
            pad_token_id=enc.pad_token_id,
            use_cache=True,
            repetition_penalty=1.0,  # checkpoints' generation configs may set one; rollouts sample the model as is
        )
        if temperature > 0:
            options.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        return options

    def _rng_devices(self) -> list[int]:
        dev = self.device
        return [dev.index or 0] if dev.type == "cuda" else []

    def _generate_batch(self, prompts: list[Prompt], copies: int, options: dict[str, Any]) -> Tensor:
        """New token ids [n * copies, new] of one memory-sized batch of prompts."""
        enc = self.backbone.encoder
        encoded = [enc.encode_prompt(p) for p in prompts]
        if not self._uses_features():
            batch = self._to_device(enc.collate(encoded, None, padding_side="left"))
        else:
            images = [prompt_images(p) for p in prompts]
            self.image_features([im for ims in images for im in ims])  # one vision call; kept for the call
            spans = [
                image_spans(e, [enc.image_features(im)[1] for im in ims], enc.image_token_id)
                for e, ims in zip(encoded, images)
            ]
            groups = None
            if self._shares_prefixes():
                groups = shared_prefix_groups(identities(encoded, images, spans), copies)
            if groups is not None:
                return self._generate_shared(encoded, images, spans, groups, copies, options)
            plain = [_without_pixels(e) for e in encoded]
            batch = self._to_device(enc.collate(plain, None, padding_side="left"))
            batch.update(self._mm_outputs([im for ims in images for im in ims]))
        seqs = self.model.generate(**batch, num_return_sequences=copies, **options)  # [n * copies, T + new]
        return seqs[:, batch["input_ids"].shape[1] :]

    def _generate_shared(
        self,
        encoded: list[EncodedPrompt],
        images: list[list[Image.Image]],
        spans: list[list[tuple[int, int]]],
        groups: list[Group],
        copies: int,
        options: dict[str, Any],
    ) -> Tensor:
        """Prefill each group's shared prefix once, copy its KV cache to the group's rows, generate the rest."""
        enc, dev = self.backbone.encoder, self.device
        ids, mask, types, width = shared_layout(encoded, groups, enc.pad_token_id)  # [n, L] each
        ids, mask, types = ids.to(dev), mask.to(dev), types.to(dev)
        positions = self._positions(ids, mask, types if enc.uses_token_types else None, images)
        dim = positions.ndim - 2  # the batch dim of [n, L] (or M-RoPE's [4, n, L]) positions
        cut_of = {i: cut for members, cut in groups for i in members}
        n_prefix = [sum(start < cut_of[i] for start, _ in spans[i]) for i in range(len(encoded))]  # images
        firsts = [members[0] for members, _ in groups]
        index = torch.tensor(firsts, device=dev)
        prefix = self.model(
            input_ids=ids[index, :width],
            attention_mask=mask[index, :width],
            position_ids=positions.index_select(dim, index)[..., :width],
            use_cache=True,
            logits_to_keep=1,
            **self._mm_outputs([im for i in firsts for im in images[i][: n_prefix[i]]]),
        )
        group_of = [g for g, (members, _) in enumerate(groups) for _ in members]
        row_group = torch.tensor(group_of, device=dev).repeat_interleave(copies)
        cache = self._static_cache(
            prefix.past_key_values, row_group, ids.shape[1] + options["max_new_tokens"]
        )
        rows: dict[str, Any] = dict(
            input_ids=ids.repeat_interleave(copies, 0),  # [n * copies, L]
            attention_mask=mask.repeat_interleave(copies, 0),
            position_ids=positions.repeat_interleave(copies, dim),
            past_key_values=cache,  # per layer [n * copies, heads, L + new, head_dim], width filled
            disable_compile=True,  # a static cache would make Hugging Face compile the forward on GPUs
        )
        if enc.uses_token_types:
            rows["mm_token_type_ids"] = types.repeat_interleave(copies, 0)
        suffix = [im for i, ims in enumerate(images) for _ in range(copies) for im in ims[n_prefix[i] :]]
        seqs = self.model.generate(**rows, **self._mm_outputs(suffix), num_return_sequences=1, **options)
        return seqs[:, ids.shape[1] :]

    def _static_cache(self, prefix: DynamicCache, rows: Tensor, length: int) -> Cache:
        """The prefix cache copied to every row (``rows`` = its group per row) into a preallocated cache of
        ``length`` positions: decoding then writes each token in place instead of copying the whole cache
        per step (Hugging Face's dynamic cache concatenates). Masked free slots add exact zeros. Models
        with sliding-window layers keep the dynamic cache."""
        cache = StaticCache(config=self.backbone.base_model.config, max_cache_len=length)
        if len(cache.layers) != len(prefix.layers) or any(layer.is_sliding for layer in cache.layers):
            prefix.batch_select_indices(rows)
            return prefix
        for old, new in zip(prefix.layers, cache.layers):
            keys, values = old.keys.index_select(0, rows), old.values.index_select(0, rows)  # [N, h, P, d]
            new.lazy_initialization(keys, values)
            new.keys[:, :, : keys.shape[2]] = keys
            new.values[:, :, : values.shape[2]] = values
            new.cumulative_length.fill_(keys.shape[2])
        return cache

    def _positions(
        self, ids: Tensor, mask: Tensor, types: Tensor | None, images: list[list[Image.Image]]
    ) -> Tensor:
        """Hugging Face's own generation position ids of these rows: [n, L], or [4, n, L] for M-RoPE
        models (which need ``types`` = mm_token_type_ids and the images' grids). Computed once per
        distinct row layout (a question's K step-2 rows differ only in pixels) and copied to the rest."""
        enc = self.backbone.encoder
        grids = [[enc.image_features(im)[0]["image_grid_thw"] for im in ims] if types is not None else []
                 for ims in images]  # fmt: skip
        parts = [ids, mask] if types is None else [ids, mask, types]
        layout = torch.cat(parts, dim=1).cpu().numpy()  # [n, 2L or 3L]
        keys = [
            (layout[i].tobytes(), tuple(tuple(g.flatten().tolist()) for g in grids[i]))
            for i in range(len(grids))
        ]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # layout -> its first row
        rows = sorted(set(first.values()))
        kwargs: dict[str, Tensor] = {"attention_mask": mask[rows]}
        if types is not None:
            kwargs["mm_token_type_ids"] = types[rows]
            if any(grids[i] for i in rows):
                kwargs["image_grid_thw"] = torch.cat([g for i in rows for g in grids[i]]).to(
                    self.device
                )  # [n_img, 3]
        unique = self.backbone.base_model._prepare_position_ids_for_generation(ids[rows], kwargs)
        slot = {row: u for u, row in enumerate(rows)}
        index = torch.tensor([slot[first[key]] for key in keys], device=unique.device)
        return unique.index_select(unique.ndim - 2, index)  # back to one per row

    # ---- scoring ------------------------------------------------------------------------------------------
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
        with torch.inference_mode(), eval_mode(self.model), self.vision_cache():
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                encoded = [enc.encode_prompt(p) for p in chunk]
                ids = [enc.encode_completion(c) for c in completions[start : start + self.batch_size]]
                if self._uses_features():
                    batch = enc.collate([_without_pixels(e) for e in encoded], ids, padding_side="right")
                    batch.update(self._mm_outputs([im for p in chunk for im in prompt_images(p)]))
                else:
                    batch = enc.collate(encoded, ids, padding_side="right")
                sums, counts = sequence_logps(self.model, self._to_device(batch))
                results.append((sums / counts.clamp(min=1) if reduction == "mean" else sums).float().cpu())
            out = torch.cat(results) if results else torch.zeros(0)
        return out.clone()  # a normal tensor (made outside inference mode), safe to use anywhere

"""Digests of model weights and processors: the one fingerprint module of the project.

Why: cached stage outputs (rollouts, reference log-probs; paper §3.3-§3.4 recompute them per iteration) are
keyed by what produced them. One digest of the weights (every parameter and buffer: names, shapes, dtypes,
bytes; same weights <=> same digest) and one of the processor (vocabulary, chat template, image-processor
settings) serve every cache, so two caches never disagree on whether a model changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from visrl.data.hashing import hash_tensor


def model_fingerprint(model: nn.Module) -> str:
    """Digest of every parameter and buffer (names, shapes, dtypes, bytes): same weights, same digest."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        hash_tensor(h, t)
    return h.hexdigest()


def policy_fingerprint(policy: Any) -> str | None:
    """:func:`model_fingerprint` of ``policy.model`` (or of ``policy`` itself when it is a module); None for
    an object without weights (e.g. a scripted or remote scorer)."""
    model = getattr(policy, "model", policy)
    return model_fingerprint(model) if isinstance(model, nn.Module) else None


def processor_fingerprint(encoder: Any) -> str:
    """Digest of the tokenizer vocabulary, chat template, encoder class and image-processor settings."""
    tok = encoder.tokenizer
    image = encoder.image_processor
    settings = image.to_dict() if hasattr(image, "to_dict") else vars(image)
    parts = [sorted(tok.get_vocab().items()), encoder.chat_template, type(encoder).__name__, settings]
    return hashlib.blake2b(
        json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()

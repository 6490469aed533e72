"""Content digests of data: config cache keys, question lists, encoded-row fingerprints.

One place for them, so that two caches never disagree on what "the same data" means. Model weights and
processors are fingerprinted by the models package (they are not data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from visrl.data.rows import Row

__all__ = ["cache_key", "hash_tensor", "rows_fingerprint", "text_sha256"]


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a UTF-8 text (e.g. the question list of a candidates file)."""
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(material: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration (keys sorted; non-JSON values by ``str``)."""
    blob = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_tensor(h: Any, t: Tensor) -> None:
    """Feed a tensor's shape, dtype and bytes to the hashlib object ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def rows_fingerprint(rows: Sequence[Row]) -> str:
    """Digest of encoded rows: step, uid, prompt ids and vision tensors, every completion, in order."""
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update(json.dumps([r.step, r.uid, [list(c) for c in r.completions]]).encode())
        for p in (r.prompt, r.rejected_prompt):
            if p is None:
                h.update(b"-")
                continue
            h.update(json.dumps([p.input_ids, p.token_type_ids]).encode())  # type: ignore[attr-defined]
            for key in sorted(p.vision):  # type: ignore[attr-defined]
                h.update(key.encode())
                hash_tensor(h, p.vision[key])  # type: ignore[attr-defined]
    return h.hexdigest()

"""Real Visual-CoT training data as the pipeline's data source (``data=viscot``), VisRL §4 setting.

The synthetic world writes its splits itself; real data is the user's download: Visual-CoT JSON lists
(``viscot_363k.json``-style records, ``visrl.data.records``) and the image root they are relative to. The
SFT split needs boxes (``###`` suffix); the RL pool's boxes are never read by training code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from visrl.data.errors import InputError
from visrl.data.records import read_viscot, write_viscot


@dataclass
class VisCoTFiles:
    """Paths of the SFT split, the RL pool, an optional test split, and the image root."""

    image_root: str | Path
    sft: str | Path
    rl: str | Path
    test: str | Path | None = None
    root: str | Path | None = (
        None  # the Visual-CoT folder the config derives the paths above from (unused here)
    )
    # smoke runs (debug=fast): the first ``sizes[split]`` records of a split, copied under ``subset_dir``
    sizes: dict[str, int] | None = None
    subset_dir: str | Path | None = None

    def ensure(self) -> dict[str, Path]:
        """Check that every configured file exists and parses; return split name -> path."""
        splits = {"sft": self.sft, "rl": self.rl, "test": self.test}
        out: dict[str, Path] = {}
        root = Path(self.image_root)
        if not root.is_dir():
            raise InputError(f"data.image_root={root} is not a directory")
        for name, path in splits.items():
            if path is None:
                continue
            path = Path(path)
            if not path.is_file():
                raise InputError(f"data.{name}={path} does not exist")
            records = read_viscot(path)  # InputError naming the file, record and field on bad input
            if not records:
                raise InputError(f"data.{name}={path}: no records (an empty list)")
            if name == "sft":
                missing = [i for i, r in enumerate(records) if r.box_px is None]
                if missing:
                    raise InputError(
                        f"{path}: records {missing[:5]} (of {len(missing)}) field 'image[1]': missing the "
                        "'###[x1, y1, x2, y2]' box the SFT split needs"
                    )
            out[name] = self._subset(name, path, records)
        return out

    def _subset(self, name: str, path: Path, records: list) -> Path:
        """``path`` itself, or a copy of its first ``sizes[name]`` records (written once, atomically)."""
        n = (self.sizes or {}).get(name)
        if n is None or n >= len(records):
            return path
        if self.subset_dir is None:
            raise InputError(
                f"data.sizes.{name}={n} needs data.subset_dir (where the smaller split is written)"
            )
        key = hashlib.sha256(f"{path.resolve()}|{path.stat().st_mtime_ns}|{n}".encode()).hexdigest()[:16]
        out = Path(self.subset_dir) / key / f"{name}.json"
        if not out.is_file():
            write_viscot(records[:n], out)
        return out

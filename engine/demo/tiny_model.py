"""A tiny open_clip model and made-up names, for the demo and the tests.

Nothing here is a real model. The tiny model goes through exactly the code path of a user's model (a
model-config JSON plus a checkpoint file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# A CLIP with two 64-wide transformer layers per tower on 32x32 images: about 3.5 M parameters, most of
# them the token embedding. Small enough to build, train and run in seconds on a CPU.
TINY_MODEL_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_FIRST = ["Anna", "José", "Zoë", "Liam", "Mei", "Omar", "Sofia", "Jürgen", "Aisha", "Noah", "Chloé", "Ravi",
          "Ingrid", "Mateo", "Yuki", "Fatima", "Lucas", "Amara", "Björn", "Elena"]
_LAST = ["Smith", "García", "Müller", "Nguyen", "Kowalski", "O'Brien", "Rossi", "Dubois", "Tanaka", "Okafor",
         "Jensen", "Silva", "Novák", "Haddad", "Lindqvist", "Moreau", "Ivanova", "Kim", "Patel", "Costa"]


def tiny_names(count: int, seed: int = 0) -> list[str]:
    """`count` distinct "First Last" names (diacritics included) drawn with `seed`."""
    if count > len(_FIRST) * len(_LAST):
        raise ValueError(f"at most {len(_FIRST) * len(_LAST)} tiny names, asked for {count}")
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(len(_FIRST) * len(_LAST))[:count]
    return [f"{_FIRST[p // len(_LAST)]} {_LAST[p % len(_LAST)]}" for p in pairs]


def write_tiny_model(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny config JSON and a seeded random-init checkpoint; return (config path, checkpoint path).

    The checkpoint is a state dict saved with torch.save, as open_clip saves weights.
    """
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "tiny-clip.json"
    config_path.write_text(json.dumps(TINY_MODEL_CONFIG, indent=2), encoding="utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_MODEL_CONFIG)
    ckpt_path = folder / "tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt_path)
    return config_path, ckpt_path

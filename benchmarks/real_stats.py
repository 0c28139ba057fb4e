"""Neighbour statistics of the synthetic generator beside those of a real encoding of census names.

No real CLIP weights exist offline on the development machine, so the "real" side is the tiny open_clip model
trained by the engine's demo (`engine.demo.run_demo`, saved as <workdir>/model/{model-config.json,
checkpoint.pt}): ~2,000 made-up census names (engine.namegen) under the 21 paper templates. The demo model is
tiny (64-d, 3 layers, trained on a few hundred captions), so its statistics say how a small CLIP-trained text
tower organises names, not what ViT-B/32 does; the comparison is reported side by side, not fitted.

Statistics (float64, unit rows): mean cosine between a name's templates; mean cosine of a name (template 0)
to its nearest other name; mean cosine between names sharing a first name / a last name / neither; mean gap
between the top-1 and top-2 score when template 0 of each name queries template 1 of all names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def neighbour_stats(views: np.ndarray, first: np.ndarray, last: np.ndarray) -> dict[str, float]:
    """views float32 [T, N, D] unit rows; first/last int [N] ids of the first and last name."""
    x = views.astype(np.float64)
    t, n, _ = x.shape
    pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
    same_name = float(np.mean([(x[a] * x[b]).sum(1).mean() for a, b in pairs[:60]]))
    s = x[0] @ x[0].T
    off = ~np.eye(n, dtype=bool)
    sf = first[:, None] == first[None, :]
    sl = last[:, None] == last[None, :]
    cross = x[0] @ x[1].T
    top2 = -np.sort(-cross, axis=1)[:, :2]
    return {"names": n, "templates": t,
            "cos_same_name_templates": same_name,
            "cos_nearest_other_name": float(np.where(off, s, -2).max(1).mean()),
            "cos_share_first": float(s[off & sf & ~sl].mean()) if (off & sf & ~sl).any() else float("nan"),
            "cos_share_last": float(s[off & sl & ~sf].mean()) if (off & sl & ~sf).any() else float("nan"),
            "cos_unrelated": float(s[off & ~sf & ~sl].mean()),
            "top1_top2_gap": float((top2[:, 0] - top2[:, 1]).mean()),
            "template0_to_template1_self_top1": float((cross.argmax(1) == np.arange(n)).mean())}


def real_stats(model_dir: Path, num_names: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Encode `num_names` census names x 21 templates with the demo model in `model_dir`."""
    from idia_engine.engine.candidates.made_up import generate_names
    from idia_engine.engine.candidates.templates import PAPER_TEMPLATES
    from idia_engine.engine.model.load import ModelSpec, load_model

    model = load_model(ModelSpec(model=str(Path(model_dir) / "model-config.json"),
                                 pretrained=str(Path(model_dir) / "checkpoint.pt")), device="cpu")
    names = generate_names(num_names, seed=seed).names
    views = np.stack([model.encode_text([tpl.format(nm) for nm in names]) for tpl in PAPER_TEMPLATES])
    firsts = {f: i for i, f in enumerate(sorted({nm.split()[0] for nm in names}))}
    lasts = {f: i for i, f in enumerate(sorted({nm.split()[-1] for nm in names}))}
    first = np.array([firsts[nm.split()[0]] for nm in names])
    last = np.array([lasts[nm.split()[-1]] for nm in names])
    out = neighbour_stats(views.astype(np.float32), first, last)
    out["model"] = str(model_dir)
    out["dim"] = int(views.shape[2])
    return out


def synthetic_stats(num_names: int = 2000, dim: int = 512, seed: int = 0) -> dict[str, Any]:
    from .synthetic import SyntheticConfig, SyntheticNames

    gen = SyntheticNames(SyntheticConfig(num_names=num_names, dim=dim, seed=seed))
    views = np.stack([gen.template(t) for t in range(gen.num_templates)])
    out = neighbour_stats(views, gen.first_ids, gen.last_ids)
    out["dim"] = dim
    return out


def compare(model_dir: Path, num_names: int = 2000) -> dict[str, Any]:
    """Both sides, and a markdown table."""
    real = real_stats(model_dir, num_names)
    synth = synthetic_stats(num_names)
    keys = [k for k in real if k not in ("model", "names", "templates", "dim")]
    table = ["| statistic | synthetic (D=512) | demo model (D={}) |".format(real["dim"]), "|---|---|---|"]
    table += [f"| {k} | {synth[k]:.4f} | {real[k]:.4f} |" for k in keys]
    return {"synthetic": synth, "real_demo_model": real, "markdown": "\n".join(table) + "\n"}


if __name__ == "__main__":
    import json
    import sys

    res = compare(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("benchmarks/results/generator-vs-demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(res, indent=2))
    (out / "stats.md").write_text(res["markdown"])
    print(res["markdown"])

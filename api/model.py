"""A CLIP model for the in-memory attack: loaded by the engine, or one the caller had already loaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from idia_engine.engine.model.load import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelInfo,
    ModelSpec,
    Precision,
    WeightsSource,
    resolve_device,
    resolve_precision,
    weights_fingerprint,
)
from idia_engine.engine.model.load import load_model as engine_load_model

log = logging.getLogger(__name__)

IN_MEMORY_PRETRAINED = "in-memory"  # ModelInfo.pretrained of a model given by `from_open_clip`


@dataclass(frozen=True)
class Model:
    """A CLIP model in eval mode with its tokenizer and validation preprocessing, ready for `attack`.

    Text and image embeddings are float32, L2-normalised (cosine similarity = inner product); forward passes
    run in `precision` on `device`.
    """

    loaded: LoadedModel  # the engine's model (open_clip module, preprocess, tokenizer, info, device, precision)

    @property
    def info(self) -> ModelInfo:
        """What was loaded: architecture, weights, preprocessing, embedding dimension, fingerprint."""
        return self.loaded.info

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the configuration, the preprocessing and every weight tensor."""
        return self.loaded.info.fingerprint

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: what the forward passes run in."""
        return self.loaded.precision.value

    def __repr__(self) -> str:
        info = self.loaded.info
        return (f"Model({info.model!r}, pretrained={info.pretrained!r}, device={str(self.device)!r}, "
                f"precision={self.precision!r}, embed_dim={info.embed_dim}, fingerprint={info.fingerprint[:12]!r})")


def load_model(model: str | Path = DEFAULT_MODEL, pretrained: str | Path | None = None, device: str = "cpu",
               precision: str = "fp32") -> Model:
    """Load a CLIP model as `build-index --model M --pretrained P` does (README, "Models and weights").

    model: an open_clip model name ("ViT-B-32"), "hf-hub:org/repo", or the path of a model-config JSON.
    pretrained: an open_clip tag ("laion2b_s34b_b79k"), "hf-hub:org/repo", a checkpoint path, "none" for
        seeded random weights, or None for the default weights of "ViT-B-32" (other models need one).
    device: "cpu", "cuda" or "auto" (CUDA when torch sees one).
    precision: "fp32" (the default: the reference, as the CLI's, so that `attack` gives the CLI's scores),
        "fp16", "bf16", or "auto": what the device multiplies natively (fp16 on CUDA, bf16 on a CPU with
        AVX-512 BF16 or AMX, else fp32), faster there but its embeddings differ in the last bits.

    Weights come from the local caches first; a download is tried only when the hub answers. Raises
    ModelLoadError, WeightsUnavailableError, InputError or DeviceError with a one-line message.
    """
    spec = ModelSpec(model=str(model), pretrained=None if pretrained is None else str(pretrained))
    return Model(engine_load_model(spec, device, precision))


def from_open_clip(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, *,
                   name: str = "in-memory open_clip model", device: str | None = None,
                   precision: str = "fp32") -> Model:
    """Wrap a model the caller loaded already, e.g. with `open_clip.create_model_and_transforms`.

    model: an open_clip CLIP (anything with `encode_text` and `encode_image`); it is put in eval mode (the
        attack is defined on eval-mode embeddings) and, when `device` is given, moved there.
    preprocess: its validation transform (PIL image -> [3, H, W] tensor), e.g. open_clip's `preprocess_val`.
    tokenizer: list of prompts -> int64 [n, context_length] token ids, e.g. `open_clip.get_tokenizer(name)`.
    name: how the model is named in results and logs.
    device: "cpu", "cuda", "auto", or None to leave the model where it is.
    precision: as in `load_model`.
    """
    if not callable(getattr(model, "encode_text", None)) or not callable(getattr(model, "encode_image", None)):
        from idia_engine.engine.errors import InputError

        raise InputError(f"from_open_clip needs a CLIP model with encode_text and encode_image, got "
                         f"{type(model).__name__}; load one with open_clip.create_model_and_transforms")
    if device is None:
        torch_device = next(model.parameters()).device
    else:
        torch_device = resolve_device(device)
        model.to(torch_device)
    model.eval()
    resolved = resolve_precision(Precision(precision), torch_device)
    config = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    # The fingerprint covers the preprocessing: the transform itself, since no config file describes it here.
    preprocess_cfg: dict[str, Any] = {**dict(getattr(getattr(model, "visual", None), "preprocess_cfg", {}) or {}),
                                      "transform": repr(preprocess)}
    with torch.inference_mode():
        embed_dim = int(model.encode_text(tokenizer(["a"]).to(torch_device)).shape[-1])
    context_length = getattr(model, "context_length", None) or getattr(tokenizer, "context_length", None) or 77
    info = ModelInfo(model=name, pretrained=IN_MEMORY_PRETRAINED, weights_source=WeightsSource.IN_MEMORY.value,
                     open_clip_name=type(model).__name__, model_config=config,
                     preprocess={k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()},
                     embed_dim=embed_dim, context_length=int(context_length), checkpoint_sha256=None,
                     fingerprint=weights_fingerprint(model, config, preprocess_cfg))
    log.info("wrapped %s (%s) on %s, %s", name, type(model).__name__, torch_device, resolved.value)
    return Model(LoadedModel(model, preprocess, tokenizer, info, torch_device, resolved))

"""Loading an open_clip model and encoding prompts and images with it.

`--model` names the architecture: an open_clip model name (`ViT-B-32`), an `hf-hub:org/repo` id, or the
path of a model-config JSON (for custom and tiny architectures). `--pretrained` names the weights: an
open_clip tag (`laion2b_s34b_b79k`), an `hf-hub:org/repo` id, the path of a local checkpoint (a state dict
as open_clip saves it), or `none` for random initialisation. Random weights are never a silent fallback.

Weights are looked up in the local caches first. A download is tried only when the hub is reachable;
otherwise the error names the model and tag and says how to pass a local checkpoint.

Every loaded model gets a fingerprint: a SHA-256 over its configuration, its image preprocessing and
every weight tensor. It goes into every manifest and every embedding-store key, so embeddings of
different models never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import DeviceError, InputError, ModelLoadError, WeightsUnavailableError
from .text_encoder import TextEncoder, TextPath

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"  # the default weights of DEFAULT_MODEL
RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0  # random init is seeded, so `--pretrained none` is reproducible
HF_HUB_PREFIX = "hf-hub:"
HUB_HOST = "huggingface.co"
# Set either to forbid download attempts (the local cache is still used).
OFFLINE_ENV_VARS = ("IDIA_OFFLINE", "HF_HUB_OFFLINE")


class Precision(str, Enum):
    """Numeric precision of the forward passes. Weights stay fp32; fp16/bf16 run under autocast. AUTO: the
    fastest the device runs natively (`resolve_precision`)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    AUTO = "auto"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self is Precision.AUTO:
            raise ValueError("Precision.AUTO has no dtype until resolve_precision picks one for a device")
        return {Precision.FP32: None, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[self]


def resolve_precision(precision: Precision | str, device: torch.device) -> Precision:
    """AUTO -> fp16 on CUDA, bf16 on a CPU that multiplies bf16 natively (AVX-512 BF16 / AMX), else fp32. A CPU
    without native bf16 emulates fp16/bf16 products: they are asked for explicitly only, with a warning (the
    text encoder ran 5.6x slower in bf16 than in fp32 on an AVX2 + FMA CPU, benchmarks/results)."""
    from .text_encoder import bf16_supported

    precision = Precision(precision)
    native_cpu = device.type == "cpu" and bf16_supported(device)
    if precision is Precision.AUTO:
        if device.type == "cuda":
            return Precision.FP16
        return Precision.BF16 if native_cpu else Precision.FP32
    if device.type == "cpu" and precision is not Precision.FP32 and not native_cpu:
        log.warning("--precision %s on a CPU without native bf16/fp16 (no AVX-512 BF16 or AMX): the products are "
                    "emulated and slower than fp32; --precision auto picks fp32 here", precision.value)
    return precision


class DeviceChoice(str, Enum):
    """Where the model runs. AUTO picks CUDA when torch sees a CUDA device, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class WeightsSource(str, Enum):
    """Where a model's weights came from; recorded in manifests."""

    OPEN_CLIP_TAG = "open_clip-tag"
    HF_HUB = "hf-hub"
    CHECKPOINT = "checkpoint"
    RANDOM_INIT = "random-init"
    IN_MEMORY = "in-memory"  # a model the caller had already loaded (the Python API's from_open_clip)


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for. `pretrained=None` means the model's default weights."""

    model: str = DEFAULT_MODEL  # open_clip name, "hf-hub:org/repo", or path to a model-config JSON
    pretrained: str | None = None  # tag, "hf-hub:org/repo", checkpoint path, "none", or None (default)


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded; stored verbatim in every manifest (JSON-friendly fields only)."""

    model: str  # as given by the user (paths made absolute)
    pretrained: str  # tag, hf-hub id, absolute checkpoint path, or "none"
    weights_source: str  # a WeightsSource value
    open_clip_name: str  # the name open_clip created the model under
    model_config: dict[str, Any]  # the architecture config used
    preprocess: dict[str, Any]  # the image preprocessing config (size, mean, std, resize mode, ...)
    embed_dim: int  # dimension of the joint embedding space
    context_length: int  # text tokens per prompt
    checkpoint_sha256: str | None  # SHA-256 of the checkpoint file, when one was loaded
    fingerprint: str  # SHA-256 over config, preprocessing and every weight tensor

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelInfo":
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})

    def as_spec(self) -> ModelSpec:
        """The spec that reloads exactly these weights."""
        return ModelSpec(model=self.model, pretrained=self.pretrained)


def resolve_device(choice: DeviceChoice | str) -> torch.device:
    choice = DeviceChoice(choice)
    if choice is DeviceChoice.CUDA:
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
        return torch.device("cuda")
    if choice is DeviceChoice.AUTO and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module, config: dict[str, Any], preprocess: dict[str, Any]) -> str:
    """SHA-256 over the architecture config, preprocessing config and every tensor of the state dict."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "preprocess": preprocess}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; hash the raw bits
            t = t.view(torch.int16)
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


# --- resolving what to load ----------------------------------------------------------------------


@contextmanager
def _hub_offline(offline: bool = True) -> Iterator[None]:
    """Make huggingface_hub answer from its local cache only (no network request, no retries)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _downloads_forbidden() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV_VARS)


def _hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """None if the hub answers a TCP connect quickly, else why not (so offline machines fail fast)."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return None
    except OSError as e:
        return f"cannot reach {HUB_HOST}: {e}"


def _ensure_cached(what: str, fetch: Callable[[], Any]) -> Any:
    """Run `fetch` from the local cache; if that fails and the hub is reachable, run it online."""
    hint = (
        "pass a local checkpoint with --pretrained /path/to/open_clip_pytorch_model.bin "
        "(and --model NAME or a model-config JSON), or --pretrained none for random weights"
    )
    try:
        with _hub_offline(True):
            return fetch()
    except Exception as cache_miss:  # noqa: BLE001 - any failure here means "not in the cache"
        log.debug("cache miss for %s: %s", what, cache_miss)
    if _downloads_forbidden():
        raise WeightsUnavailableError(
            f"{what} are not in the local cache and downloads are off (HF_HUB_OFFLINE/IDIA_OFFLINE); {hint}"
        )
    reason = _hub_unreachable_reason()
    if reason:
        raise WeightsUnavailableError(f"{what} are not available offline: not in the local cache and {reason}; {hint}")
    log.info("downloading %s", what)
    try:
        with _hub_offline(False):
            return fetch()
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailableError(f"{what} could not be downloaded ({type(e).__name__}: {e}); {hint}") from e


@dataclass
class _LoadPlan:
    """How to call open_clip for a ModelSpec (internal)."""

    info_model: str
    info_pretrained: str
    source: WeightsSource
    open_clip_name: str
    pretrained_arg: str | None
    model_config: dict[str, Any]
    force_preprocess: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: Path | None = None
    offline_create: bool = True  # call open_clip with the hub in offline mode (everything is cached)


# Model-config JSONs given by path are registered with open_clip, which only takes files: they are written
# once per process into one temporary directory (removed when the process ends), named by content hash.
_CONFIG_DIR: tempfile.TemporaryDirectory | None = None


def _register_config_file(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Register a model-config JSON with open_clip under a unique name; return (name, config, preprocess)."""
    global _CONFIG_DIR
    import open_clip

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"model config {path} is not readable JSON ({e})") from None
    preprocess: dict[str, Any] = {}
    if isinstance(obj, dict) and "model_cfg" in obj:  # the open_clip_config.json form of the hub
        preprocess = dict(obj.get("preprocess_cfg") or {})
        obj = obj["model_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise InputError(
            f"model config {path} lacks {', '.join(missing)}; give an open_clip model config "
            "(keys embed_dim, vision_cfg, text_cfg) or an open_clip_config.json with model_cfg"
        )
    text = json.dumps(obj, sort_keys=True)
    name = f"idia-custom-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if name not in open_clip.list_models():
        if _CONFIG_DIR is None:
            _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="idia-model-config-")
        file = Path(_CONFIG_DIR.name) / f"{name}.json"
        file.write_text(text, encoding="utf-8")
        open_clip.add_model_config(file)
    return name, obj, preprocess


def _hub_config(hub_id: str) -> dict[str, Any]:
    """open_clip_config.json of a hub repo (model_cfg and preprocess_cfg), through open_clip's public download."""
    from open_clip import pretrained as oc_pretrained

    path = oc_pretrained.download_pretrained_from_hf(hub_id, filename="open_clip_config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_plan(spec: ModelSpec) -> _LoadPlan:
    """How to load `spec`: an hf-hub repo (config and weights from it), or a config (built-in name or JSON
    file) with weights from a tag, a checkpoint file, or none."""
    model, pretrained = spec.model.strip(), spec.pretrained
    if pretrained is not None:
        pretrained = pretrained.strip()
    hub_id = None
    if model.startswith(HF_HUB_PREFIX):
        hub_id = model[len(HF_HUB_PREFIX):]
        if pretrained not in (None, model) and pretrained.lower() != RANDOM_INIT:
            raise InputError(
                f"--model {model} takes its weights from the hub repo; leave --pretrained unset (got {pretrained!r})"
            )
    elif pretrained is not None and pretrained.startswith(HF_HUB_PREFIX):
        hub_id = pretrained[len(HF_HUB_PREFIX):]
        if model != DEFAULT_MODEL and model != pretrained:
            log.warning("--pretrained %s brings its own architecture; --model %s is ignored", pretrained, model)
    if hub_id is not None:
        return _hub_plan(hub_id, pretrained)
    return _weights_plan(model, pretrained)


def _hub_plan(hub_id: str, pretrained: str | None) -> _LoadPlan:
    """hf-hub: the repo holds both the config and the weights."""
    from open_clip import pretrained as oc_pretrained

    if not hub_id or hub_id.count("/") != 1:
        raise InputError(f"hf-hub id {hub_id!r} is not of the form org/repo")
    label = f"open_clip config and weights of hf-hub:{hub_id}"
    config = _ensure_cached(label, lambda: _hub_config(hub_id))
    name = f"{HF_HUB_PREFIX}{hub_id}"
    if pretrained is not None and pretrained.lower() == RANDOM_INIT:
        return _LoadPlan(name, RANDOM_INIT, WeightsSource.RANDOM_INIT, name, None, config.get("model_cfg", config))
    ckpt = _ensure_cached(label, lambda: oc_pretrained.download_pretrained_from_hf(hub_id))
    return _LoadPlan(name, name, WeightsSource.HF_HUB, name, None, config.get("model_cfg", config),
                 checkpoint_path=Path(ckpt))


def _weights_plan(model: str, pretrained: str | None) -> _LoadPlan:
    """A model-config JSON or a built-in open_clip name, with weights from a tag, a checkpoint, or none."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    force_preprocess: dict[str, Any] = {}
    as_path = Path(model).expanduser()
    if model.endswith(".json") or as_path.is_file():
        if not as_path.is_file():
            raise InputError(f"model config {model} does not exist")
        as_path = as_path.resolve()
        oc_name, config, force_preprocess = _register_config_file(as_path)
        info_model = str(as_path)
    else:
        if model not in open_clip.list_models():
            raise InputError(
                f"unknown model {model!r}; give an open_clip model name (e.g. ViT-B-32, see "
                "open_clip.list_models()), an hf-hub:org/repo id, or the path of a model-config JSON"
            )
        oc_name, config, info_model = model, open_clip.get_model_config(model), model
    registered = oc_name in open_clip.list_models()
    if pretrained is None:
        if oc_name != DEFAULT_MODEL:
            tags = open_clip.list_pretrained_tags_by_model(oc_name) if registered else []
            raise InputError(
                f"--model {model} needs --pretrained: "
                + (f"an open_clip tag ({', '.join(tags)}), " if tags else "")
                + "a local checkpoint path, or none for random weights"
            )
        pretrained = DEFAULT_PRETRAINED
    if pretrained.lower() == RANDOM_INIT:
        return _LoadPlan(info_model, RANDOM_INIT, WeightsSource.RANDOM_INIT, oc_name, None, config, force_preprocess)
    tag_cfg = open_clip.get_pretrained_cfg(oc_name, pretrained) if registered else {}
    if tag_cfg:
        label = f"pretrained weights for {oc_name} / {pretrained}"
        path = _ensure_cached(label, lambda: oc_pretrained.download_pretrained(tag_cfg))
        return _LoadPlan(info_model, pretrained, WeightsSource.OPEN_CLIP_TAG, oc_name, pretrained, config,
                     force_preprocess, checkpoint_path=Path(path))
    ckpt = Path(pretrained).expanduser()
    if ckpt.is_file():
        ckpt = ckpt.resolve()
        return _LoadPlan(info_model, str(ckpt), WeightsSource.CHECKPOINT, oc_name, str(ckpt), config,
                     force_preprocess, checkpoint_path=ckpt)
    tags = open_clip.list_pretrained_tags_by_model(oc_name)
    raise InputError(
        f"--pretrained {pretrained!r} is neither a checkpoint file nor an open_clip tag of {oc_name}"
        + (f" (tags: {', '.join(tags)})" if tags else "")
        + "; give a checkpoint path, a tag, an hf-hub:org/repo id, or none"
    )


# --- the loaded model ----------------------------------------------------------------------------


class LoadedModel:
    """An open_clip model in eval mode with its tokenizer and validation preprocessing.

    `encode_text` and `encode_images` return float32 numpy arrays of shape [B, embed_dim], L2-normalised
    row-wise (cosine similarity = inner product).
    """

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, info: ModelInfo,
                 device: torch.device, precision: Precision):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.precision = precision
        # Trimmed, shared-prefix text forward pass where it provably equals model.encode_text (see
        # text_encoder.py); open_clip's own encode_text otherwise. Logs which, once.
        # On CUDA under fp16/bf16 autocast the stock pass was measured 3-4x faster than the fast one
        # (benchmarks/results/gpu-h200-2026-11-28: 15,000-21,000 vs ~5,000 prompts/s), so it is used there.
        half_on_gpu = device.type == "cuda" and precision.autocast_dtype is not None
        self.text_encoder = TextEncoder(model, allow_fast=not half_on_gpu,
                                        disabled_because="fp16/bf16 on CUDA: the stock pass is faster there")

    @property
    def text_path(self) -> TextPath:
        """Which code computes text embeddings: TextPath.FAST or TextPath.STOCK (why: text_encoder.reason)."""
        return self.text_encoder.path

    def _autocast(self):
        dtype = self.precision.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> [len(prompts), D] float32, L2-normalised."""
        tokens = self.tokenizer(list(prompts))  # the encoder plans batches on the CPU, then moves them
        with self._autocast():
            emb = self.text_encoder.encode(tokens)
        return _l2_normalize(emb)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed pixels [B, 3, H, W] -> [B, D] float32, L2-normalised."""
        with self._autocast():
            emb = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _l2_normalize(emb)


def _l2_normalize(emb: torch.Tensor) -> np.ndarray:
    # Normalise in float32 whatever the autocast dtype was, so stored vectors have unit norm to 1e-6.
    emb = emb.float()
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return emb.cpu().numpy().astype(np.float32, copy=False)


def load_model(spec: ModelSpec, device: DeviceChoice | str = DeviceChoice.AUTO,
               precision: Precision | str = Precision.FP32) -> LoadedModel:
    """Load `spec` (see the module docstring); raise ModelLoadError / InputError with a clear message."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    plan = _load_plan(spec)

    kwargs: dict[str, Any] = dict(precision="fp32", device="cpu", pretrained_text=False, pretrained_image=False)
    if plan.force_preprocess:
        kwargs["force_preprocess_cfg"] = plan.force_preprocess
    pretrained_arg = plan.pretrained_arg
    if plan.source is WeightsSource.RANDOM_INIT:
        pretrained_arg = None
        kwargs["load_weights"] = False
    try:
        with _hub_offline(True), torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(plan.open_clip_name, pretrained_arg, **kwargs)
            # The model's own validation preprocessing (resize, centre crop, normalise), as open_clip builds it.
            preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
            tokenizer = open_clip.get_tokenizer(plan.open_clip_name)
    except Exception as e:  # noqa: BLE001 - open_clip raises bare RuntimeError/KeyError/ValueError
        what = plan.info_pretrained if plan.source is not WeightsSource.RANDOM_INIT else "random init"
        raise ModelLoadError(
            f"could not load model {plan.info_model} with weights {what}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    model.eval()

    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    fingerprint = weights_fingerprint(model, plan.model_config, preprocess_cfg)
    ckpt_sha = sha256_file(plan.checkpoint_path) if plan.source is WeightsSource.CHECKPOINT else None
    text_cfg = plan.model_config.get("text_cfg", {})
    info = ModelInfo(
        model=plan.info_model,
        pretrained=plan.info_pretrained,
        weights_source=plan.source.value,
        open_clip_name=plan.open_clip_name if not plan.open_clip_name.startswith("idia-custom-") else "custom",
        model_config=plan.model_config,
        preprocess=json.loads(json.dumps(preprocess_cfg, default=list)),
        embed_dim=int(plan.model_config["embed_dim"]),
        context_length=int(getattr(model, "context_length", text_cfg.get("context_length", 77)) or 77),
        checkpoint_sha256=ckpt_sha,
        fingerprint=fingerprint,
    )
    if plan.source is WeightsSource.RANDOM_INIT:
        log.warning("model %s uses RANDOM weights (--pretrained none): results show the pipeline, not an attack",
                    plan.info_model)
    model.to(torch_device)
    return LoadedModel(model, preprocess, tokenizer, info, torch_device, precision)

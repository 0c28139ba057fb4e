"""Training a small open_clip model from scratch on a synthetic world, saved the way open_clip saves models.

The result is an ordinary open_clip model: a model-config JSON plus a checkpoint (`{"state_dict": ...}`)
that `build-index` and `query` load through exactly the code path of a user's checkpoint. Training is
standard CLIP: symmetric InfoNCE over a batch of image-caption pairs (`open_clip.ClipLoss`), AdamW,
warm-up then cosine decay, a learnable temperature. Images go through the model's own preprocessing,
so the attack later sees photos prepared the same way.

Training is deterministic for a seed on a given machine: the data order, the initialisation and every
random draw come from seeded generators, and nothing runs in parallel threads that could reorder sums
other than torch's own intra-op kernels.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..disk.atomic import write_bytes_atomic, write_json_atomic
from ..progress import Progress, no_progress
from .world import World

# The demo's model: a CLIP with small ViT towers (32x32 images in 8x8 patches, 64-wide, 3 layers each)
# and a 24-token context (the longest training caption or attack prompt fits). About 3.5 M parameters,
# most of them the token embedding.
DEMO_MODEL_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


@dataclass(frozen=True)
class TrainConfig:
    """The demo's schedule: 12 epochs at a peak learning rate of 3e-3 (180 steps on the default world).

    It was 30 epochs at 2e-3; on seed 0, 12 at 3e-3 still finds every member seen >= 10 times on their
    32 held-out photos, in 40 % of the steps (the demo has to run in 2 minutes on a 2-core CPU and
    training is most of it). 10 epochs at 4e-3, 8 epochs of batches of 128 at 3e-3, and 12 epochs with
    half the shape captions all lost members seen 10-75 times.
    """

    epochs: int = 12  # passes over the training pairs
    batch_size: int = 256  # pairs per step (the contrastive loss's negatives)
    lr: float = 3e-3  # peak learning rate, reached after the warm-up
    weight_decay: float = 0.1  # AdamW's, on every weight but the token embedding
    warmup_fraction: float = 0.05  # share of the steps that ramp the learning rate up linearly
    seed: int = 0  # initialisation and data order
    model_config: dict | None = None  # default: DEMO_MODEL_CONFIG


@dataclass(frozen=True)
class TrainedModel:
    config_path: Path  # open_clip model-config JSON
    checkpoint_path: Path  # torch.save({"state_dict": ...})
    pairs: int
    steps: int
    seconds: float
    final_loss: float


def train_clip_on_world(world: World, out_dir: Path, config: TrainConfig = TrainConfig(),
                        progress: Progress = no_progress) -> TrainedModel:
    """Train a CLIP from scratch on the world's training pairs; write config + checkpoint to out_dir."""
    import open_clip

    model_config = config.model_config or DEMO_MODEL_CONFIG
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = open_clip.CLIP(**model_config)
        images, texts = _training_data(world, model_config, progress)
        steps, loss = _train(model, images, texts, config, progress)
    model.token_embedding.sparse = False  # a plain open_clip model again
    config_path = out_dir / "model-config.json"
    write_json_atomic(config_path, model_config)
    checkpoint_path = out_dir / "checkpoint.pt"
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buffer)
    write_bytes_atomic(checkpoint_path, buffer.getvalue())
    seconds = time.perf_counter() - t0
    write_json_atomic(out_dir / "training.json",
                      {"pairs": len(texts), "epochs": config.epochs, "steps": steps, "batch_size": config.batch_size,
                       "lr": config.lr, "seed": config.seed, "final_loss": loss, "seconds": round(seconds, 1)})
    return TrainedModel(config_path, checkpoint_path, len(texts), steps, seconds, loss)


def _training_data(world: World, model_config: dict, progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training pair's image through the model's own validation preprocessing, and its caption's tokens."""
    import open_clip

    size = model_config["vision_cfg"]["image_size"]
    preprocess = open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(size=size), is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_config["text_cfg"]["context_length"])
    pairs = world.training_pairs
    progress("render training data", 0, len(pairs))
    images = torch.empty((len(pairs), 3, size, size))
    for i, pair in enumerate(pairs):
        images[i] = preprocess(world.render_training_image(pair))
        if i % 256 == 255 or i == len(pairs) - 1:
            progress("render training data", i + 1, len(pairs))
    return images, tokenizer([p.caption for p in pairs])


def _optimizers(model: torch.nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    # The token embedding (49,408 x width) is most of the model, yet a batch touches a few hundred of
    # its rows: sparse gradients and SparseAdam update only those rows, which makes a step ~2x cheaper
    # on a CPU. Everything else trains with AdamW as usual.
    model.token_embedding.sparse = True
    dense_params = [p for n, p in model.named_parameters() if n != "token_embedding.weight"]
    return [torch.optim.SparseAdam([model.token_embedding.weight], lr=config.lr),
            torch.optim.AdamW(dense_params, lr=config.lr, weight_decay=config.weight_decay)]


def _lr_schedule(config: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(total_steps * config.warmup_fraction))

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        return 0.5 * config.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return lr_at


def _train(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, config: TrainConfig,
           progress: Progress) -> tuple[int, float]:
    """The training loop; returns (steps taken, last loss)."""
    import open_clip

    loss_fn = open_clip.ClipLoss()
    optimizers = _optimizers(model, config)
    n = len(texts)
    total_steps = math.ceil(n / config.batch_size) * config.epochs
    lr_at = _lr_schedule(config, total_steps)
    order_rng = torch.Generator().manual_seed(config.seed)
    model.train()
    step, loss_value = 0, float("nan")
    progress("train", 0, total_steps)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=order_rng)
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            if len(batch) < 2:
                continue  # a contrastive loss needs negatives
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
            image_features, text_features, logit_scale = model(images[batch], texts[batch])[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            with torch.no_grad():  # CLIP's clamp: the temperature may not exceed 100
                model.logit_scale.clamp_(0, math.log(100))
            loss_value = float(loss.detach())
            step += 1
            progress("train", step, total_steps)
    return step, loss_value

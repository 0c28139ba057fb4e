"""Model loading: every way of naming weights, tested with local files (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from idia_engine.engine.demo.tiny_model import TINY_MODEL_CONFIG, write_tiny_model
from idia_engine.engine.errors import DeviceError, InputError, ModelLoadError, WeightsUnavailableError
from idia_engine.engine.model.load import ModelSpec, load_model

PROMPTS = ["a photo of Zoë Müller", "José García", "actor Liam O'Brien"]


def test_local_checkpoint_loads_and_fingerprint_is_stable(tiny_spec, tiny_model):
    again = load_model(tiny_spec, "cpu", "fp32")
    assert again.info.fingerprint == tiny_model.info.fingerprint
    assert again.info.weights_source == "checkpoint"
    assert again.info.checkpoint_sha256 and len(again.info.checkpoint_sha256) == 64
    emb = again.encode_text(PROMPTS)
    assert emb.dtype == np.float32 and emb.shape == (3, TINY_MODEL_CONFIG["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb, tiny_model.encode_text(PROMPTS))


def test_fingerprint_changes_with_the_weights(tmp_path, tiny_model):
    config, ckpt = write_tiny_model(tmp_path, seed=1)
    other = load_model(ModelSpec(str(config), str(ckpt)), "cpu")
    assert other.info.fingerprint != tiny_model.info.fingerprint


def test_checkpoint_matches_stock_open_clip(tiny_model_files, tiny_model):
    """The engine's encoder equals open_clip's own, loaded the stock way."""
    config, ckpt = tiny_model_files
    open_clip.add_model_config(config)  # registers "tiny-clip"
    stock = open_clip.create_model("tiny-clip", pretrained=str(ckpt)).eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(stock.encode_text(tok(PROMPTS)), dim=-1).numpy()
    np.testing.assert_allclose(tiny_model.encode_text(PROMPTS), ref, atol=1e-5)


@pytest.mark.parametrize("form", ["raw_state_dict", "ddp_module_prefix", "safetensors"])
def test_checkpoint_formats(tmp_path, tiny_model_files, tiny_model, form):
    config, ckpt = tiny_model_files
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    if form == "raw_state_dict":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif form == "ddp_module_prefix":  # what open_clip's distributed training writes
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model(ModelSpec(str(config), str(path)), "cpu")
    assert loaded.info.fingerprint == tiny_model.info.fingerprint


def test_open_clip_config_json_form_with_preprocess(tmp_path, tiny_model_files):
    _, ckpt = tiny_model_files
    cfg = tmp_path / "open_clip_config.json"
    cfg.write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIG,
                               "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    loaded = load_model(ModelSpec(str(cfg), str(ckpt)), "cpu")
    assert loaded.info.preprocess["mean"] == [0.5, 0.5, 0.5]


def test_random_init_only_when_asked(tiny_model_files, caplog):
    config, _ = tiny_model_files
    with caplog.at_level("WARNING"):
        a = load_model(ModelSpec(str(config), "none"), "cpu")
    b = load_model(ModelSpec(str(config), "None"), "cpu")
    assert a.info.weights_source == "random-init" and a.info.pretrained == "none"
    assert a.info.fingerprint == b.info.fingerprint  # seeded, so reproducible
    assert "RANDOM weights" in caplog.text
    with pytest.raises(InputError, match="needs --pretrained"):
        load_model(ModelSpec(str(config), None), "cpu")  # a custom config has no default weights


def _fake_hub_repo(cache: Path, repo: str, files: dict[str, Path | str]) -> None:
    """Lay out files the way huggingface_hub caches a downloaded repo."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snap / name)
        else:
            (snap / name).write_text(content)


@pytest.fixture
def fake_hub_cache(tmp_path, monkeypatch, tiny_model_files):
    from huggingface_hub import constants

    _, ckpt = tiny_model_files
    cache = tmp_path / "hub"
    _fake_hub_repo(cache, "test-org/tiny-clip", {
        "open_clip_config.json": json.dumps({"model_cfg": TINY_MODEL_CONFIG, "preprocess_cfg": {}}),
        "open_clip_pytorch_model.bin": ckpt,
    })
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("spec", [ModelSpec("hf-hub:test-org/tiny-clip"),
                                  ModelSpec("ViT-B-32", "hf-hub:test-org/tiny-clip")])
def test_hf_hub_id_from_the_local_cache(fake_hub_cache, tiny_model, spec):
    loaded = load_model(spec, "cpu")
    assert loaded.info.weights_source == "hf-hub"
    assert loaded.info.pretrained == "hf-hub:test-org/tiny-clip"
    assert loaded.info.fingerprint == tiny_model.info.fingerprint


def test_open_clip_tag_from_the_local_cache(fake_hub_cache, tiny_model, tmp_path, monkeypatch):
    from open_clip import pretrained

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "TinyTest-32.json").write_text(json.dumps(TINY_MODEL_CONFIG))
    open_clip.add_model_config(cfg_dir / "TinyTest-32.json")
    monkeypatch.setitem(pretrained._PRETRAINED, "TinyTest-32",
                        {"tinytag": pretrained._pcfg(hf_hub="test-org/tiny-clip/")})
    loaded = load_model(ModelSpec("TinyTest-32", "tinytag"), "cpu")
    assert loaded.info.weights_source == "open_clip-tag"
    assert loaded.info.fingerprint == tiny_model.info.fingerprint


def test_missing_weights_offline_say_what_and_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as e:
        load_model(ModelSpec(), "cpu")  # ViT-B-32 / laion2b_s34b_b79k, not cached here
    msg = str(e.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg and "--pretrained" in msg and "\n" not in msg
    with pytest.raises(WeightsUnavailableError, match="hf-hub:nobody/nothing"):
        load_model(ModelSpec("hf-hub:nobody/nothing"), "cpu")


@pytest.mark.parametrize("spec, match", [
    (ModelSpec("No-Such-Model", "none"), "unknown model 'No-Such-Model'"),
    (ModelSpec("ViT-B-32", "no_such_tag"), "neither a checkpoint file nor an open_clip tag"),
    (ModelSpec("/nonexistent/config.json", "none"), "does not exist"),
    (ModelSpec("hf-hub:justonepart", None), "org/repo"),
])
def test_bad_model_names(spec, match):
    with pytest.raises(InputError, match=match):
        load_model(spec, "cpu")


def test_config_without_required_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(InputError, match="lacks vision_cfg, text_cfg"):
        load_model(ModelSpec(str(bad), "none"), "cpu")


def test_checkpoint_of_another_architecture(tmp_path, tiny_model_files):
    config, ckpt = tiny_model_files
    wider = dict(TINY_MODEL_CONFIG, embed_dim=32)
    cfg = tmp_path / "wider.json"
    cfg.write_text(json.dumps(wider))
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(ModelSpec(str(cfg), str(ckpt)), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(tiny_spec):
    with pytest.raises(DeviceError, match="--device cuda"):
        load_model(tiny_spec, "cuda")


def test_auto_device_falls_back_to_cpu(tiny_spec):
    loaded = load_model(tiny_spec, "auto")
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_agrees_with_fp32(tiny_spec, tiny_model, precision):
    low = load_model(tiny_spec, "cpu", precision)
    cos = (low.encode_text(PROMPTS) * tiny_model.encode_text(PROMPTS)).sum(1)
    assert cos.min() > 0.999


def test_precision_auto_follows_what_the_device_runs_natively(monkeypatch, caplog):
    import torch
    from idia_engine.engine.model import load, text_encoder

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expected in ((False, load.Precision.FP32), (True, load.Precision.BF16)):
        monkeypatch.setattr(text_encoder, "bf16_supported", lambda device, native=native: native)
        assert load.resolve_precision("auto", cpu) is expected
    assert load.resolve_precision("auto", cuda) is load.Precision.FP16
    monkeypatch.setattr(text_encoder, "bf16_supported", lambda device: False)
    with caplog.at_level("WARNING"):
        assert load.resolve_precision("bf16", cpu) is load.Precision.BF16  # asked for: kept, with a warning
    assert "emulated" in caplog.text
    with pytest.raises(ValueError):
        load.Precision.AUTO.autocast_dtype

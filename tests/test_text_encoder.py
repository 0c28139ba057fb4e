"""The fast text encoder: equal to open_clip's own encode_text where it is used, the stock path elsewhere.

Oracle: the stock `model.encode_text` on the full padded context. Tolerances: 1e-5 max abs in fp32 (the
fast path only reorders floating-point sums), cosine >= 0.999 under bf16/fp16 autocast.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from idia_engine.benchmarks.text_encoder import benchmark_text_encoder
from idia_engine.engine.candidates.templates import PAPER_TEMPLATES, render
from idia_engine.engine.demo.tiny_model import TINY_MODEL_CONFIG, tiny_names
from idia_engine.engine.model.load import LoadedModel, Precision, load_model
from idia_engine.engine.model.text_encoder import (
    TextEncoder,
    TextPath,
    plan_batches,
    pooled_positions,
)
from open_clip.transformer import TextTransformer

FP32_ATOL = 1e-5
LOW_PRECISION_MIN_COSINE = 0.999
CONTEXT = TINY_MODEL_CONFIG["text_cfg"]["context_length"]

# Very different lengths: empty, whitespace, one letter, odd Unicode, and two prompts longer than the
# context (stock truncates them and ends them with the end-of-text token).
ODD_PROMPTS = [
    "", " ", "a", "Zoë", "José García", "北京 李小龍", "محمد بن سلمان", "Zoë 🙂\u200d Ελένη",
    "e\u0301le\u0300ve O'Brien-Smith III", "{0} {} braces", "A" * 300,
    "the name of the person is " + "Anna Maria " * 20,
]
NAMES = tiny_names(12, seed=3)
TEMPLATE_PROMPTS = [render(t, n) for t in PAPER_TEMPLATES for n in NAMES[:3]]
PROMPTS = ODD_PROMPTS + TEMPLATE_PROMPTS


def _tiny(text_cfg: dict | None = None, *, custom_text: bool = False, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A seeded tiny open_clip model in eval mode, its text config overridden by `text_cfg`."""
    cfg = copy.deepcopy(TINY_MODEL_CONFIG)
    cfg["text_cfg"].update(text_cfg or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        return cls(**cfg, **kwargs).eval()


@pytest.fixture(scope="module")
def tokens(tiny_model) -> torch.Tensor:
    return tiny_model.tokenizer(PROMPTS)


def _stock(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_text(tokens)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_prompts_cover_truncation_and_many_lengths(tokens):
    ends = pooled_positions(tokens, "argmax") + 1
    assert int(ends.max()) == CONTEXT  # a truncated prompt: pooled at the last position, as stock does
    assert int(ends.min()) == 2  # the empty prompt: <start> <end>
    assert len(set(ends.tolist())) >= 8


def test_loaded_model_uses_the_fast_path_and_matches_stock(tiny_model, tokens):
    assert tiny_model.text_path is TextPath.FAST
    assert "argmax" in tiny_model.text_encoder.reason
    ref = F.normalize(_stock(tiny_model.model, tokens), dim=-1).numpy()
    np.testing.assert_allclose(tiny_model.encode_text(PROMPTS), ref, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("device, precision, path", [
    ("cpu", Precision.BF16, TextPath.FAST), ("cuda", Precision.FP32, TextPath.FAST),
    ("cuda", Precision.FP16, TextPath.STOCK), ("cuda", Precision.BF16, TextPath.STOCK)])
def test_half_precision_on_cuda_uses_the_measured_faster_stock_path(tiny_model, device, precision, path):
    # Only the choice is checked here (nothing runs on the device): H200 measurements put the stock pass
    # 4x ahead of the fast one under fp16/bf16 autocast, and the fast one 3.5-4.3x ahead in fp32.
    chosen = LoadedModel(tiny_model.model, tiny_model.preprocess, tiny_model.tokenizer, tiny_model.info,
                         torch.device(device), precision)
    assert chosen.text_path is path
    assert path is TextPath.FAST or "CUDA" in chosen.text_encoder.reason


@pytest.mark.parametrize("custom_text, text_cfg, kwargs", [
    (False, {}, {}),
    (True, {}, {}),
    (False, {"pool_type": "eos", "eos_id": 49407}, {}),  # pooled at the end-of-text token by id
    (False, {"pool_type": "eos"}, {}),  # open_clip's default eos_id 2 is absent: pooled at position 0
    (False, {"pool_type": "first"}, {}),
    (True, {"proj_bias": True, "ls_init_value": 0.1}, {"quick_gelu": True}),  # Linear projection, LayerScale
    (False, {"proj_type": "none"}, {}),  # no projection: features are the tower's width
], ids=["clip-argmax", "customtext-argmax", "eos-eot", "eos-absent", "first", "linear-proj-layerscale-quickgelu",
        "no-projection"])
def test_fast_path_matches_stock_fp32(tokens, custom_text, text_cfg, kwargs):
    model = _tiny(text_cfg, custom_text=custom_text, **kwargs)
    encoder = TextEncoder(model)
    assert encoder.path is TextPath.FAST, encoder.reason
    ref = _stock(model, tokens)
    out = encoder.encode(tokens)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _max_abs(out, ref) <= FP32_ATOL


def test_input_order_duplicates_and_single_prompts(tiny_model, tokens):
    encoder = tiny_model.text_encoder
    full = encoder.encode(tokens)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(tokens)))
    assert _max_abs(encoder.encode(tokens[perm]), full[perm]) <= FP32_ATOL
    twice = encoder.encode(torch.cat([tokens[:5], tokens[:5]]))
    assert _max_abs(twice[:5], twice[5:]) <= FP32_ATOL
    for i in (0, 3, 10, len(tokens) - 1):
        assert _max_abs(encoder.encode(tokens[i:i + 1])[0], full[i]) <= FP32_ATOL


@pytest.mark.parametrize("max_prompts, max_tokens", [(1, 10**6), (3, 10**6), (1000, 20)])
def test_small_batches_match_stock(tiny_model, tokens, max_prompts, max_tokens):
    encoder = TextEncoder(tiny_model.model, max_batch_prompts=max_prompts, max_batch_tokens=max_tokens)
    assert _max_abs(encoder.encode(tokens), _stock(tiny_model.model, tokens)) <= FP32_ATOL


def test_one_template_shares_its_prefix(tiny_model):
    template = "a photo of a person with the name {0}"
    tokens = tiny_model.tokenizer([render(template, n) for n in NAMES])
    batches = plan_batches(tokens.numpy(), pooled_positions(tokens, "argmax").numpy())
    assert len(batches) == 1
    prefix = len(tiny_model.tokenizer(["a photo of a person with the name"])[0].nonzero()) - 1  # <start> + words
    assert batches[0].prefix >= prefix
    assert _max_abs(tiny_model.text_encoder.encode(tokens), _stock(tiny_model.model, tokens)) <= FP32_ATOL


@pytest.mark.parametrize("rows, pooled, max_prompts, expected", [
    # one template: <start>=1 "a"=5 "photo"=6, names differ at position 3
    ([[1, 5, 6, 7, 9, 0], [1, 5, 6, 8, 9, 0], [1, 5, 6, 8, 8, 9]], [4, 4, 5], 10, [(3, [0, 2, 1])]),
    # identical prompts: the pooled token stays outside the prefix
    ([[1, 5, 9, 0], [1, 5, 9, 0]], [2, 2], 10, [(2, [0, 1])]),
    # tokens after the pooled position are ignored
    ([[1, 5, 9, 7], [1, 5, 9, 8]], [2, 2], 10, [(2, [0, 1])]),
    # nothing in common
    ([[2, 9, 0], [1, 9, 0]], [1, 1], 10, [(0, [1, 0])]),
    # prompts sorted by their tokens, then cut by max_prompts
    ([[1, 7, 9], [1, 5, 9], [1, 6, 9], [1, 5, 8]], [2, 2, 2, 2], 2, [(2, [3, 1]), (1, [2, 0])]),
    # a single prompt: everything before its pooled token is prefix
    ([[1, 5, 6, 9]], [3], 10, [(3, [0])]),
    # "first" pooling: nothing can be shared
    ([[1, 5, 9], [1, 5, 9]], [0, 0], 10, [(0, [0, 1])]),
])
def test_plan_batches(rows, pooled, max_prompts, expected):
    batches = plan_batches(np.array(rows), np.array(pooled), max_prompts=max_prompts)
    assert [(b.prefix, b.rows.tolist()) for b in batches] == expected


def test_plan_batches_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, width = int(rng.integers(1, 30)), int(rng.integers(2, 8))
        tokens = rng.integers(0, 3, size=(n, width))  # few symbols: long shared prefixes are common
        tokens[:, 0] = 7
        pooled = rng.integers(0, width, size=n)
        batches = plan_batches(tokens, pooled, max_prompts=int(rng.integers(1, 8)), max_tokens=int(rng.integers(1, 40)))
        assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(n))
        for b in batches:
            sub, ends = tokens[b.rows], pooled[b.rows]
            longest = 0  # brute-force common prefix, capped below every pooled position
            while longest < ends.min() and (sub[:, longest] == sub[0, longest]).all():
                longest += 1
            assert b.prefix == longest


def _subclass_text(model):
    class HFLikeText(TextTransformer):  # stands in for a Hugging Face or otherwise foreign text tower
        pass

    model.text.__class__ = HFLikeText
    return model


def _override_encode_text(model):
    class MyCLIP(open_clip.CLIP):
        def encode_text(self, text, normalize: bool = False):
            return super().encode_text(text, normalize) * 2

    model.__class__ = MyCLIP
    return model


@pytest.mark.parametrize("build, reason", [
    (lambda: _tiny({"no_causal_mask": True, "pool_type": "last"}), "'last'"),  # SigLIP-like
    (lambda: _tiny({"pool_type": "last"}), "'last'"),  # causal, but pooled behind the padding
    (lambda: _tiny({"pool_type": "none"}), "'none'"),
    (lambda: _tiny({"no_causal_mask": True}), "bidirectional"),
    (lambda: _tiny({"embed_cls": True}, custom_text=True), "class token"),  # CoCa-style
    (lambda: _tiny({"qk_norm": True}), "standard residual attention block"),
    (lambda: _subclass_text(_tiny(custom_text=True)), "not open_clip's TextTransformer"),
    (lambda: _override_encode_text(_tiny()), "MyCLIP is not open_clip's CLIP"),
], ids=["siglip-like", "last-pool", "none-pool", "bidirectional", "cls-token", "custom-blocks", "foreign-tower",
        "own-encode-text"])
def test_unsupported_towers_use_the_stock_path(tokens, caplog, build, reason):
    model = build()
    with caplog.at_level(logging.INFO, logger="idia_engine.engine.model.text_encoder"):
        encoder = TextEncoder(model)
    assert encoder.path is TextPath.STOCK
    assert reason in encoder.reason
    assert "stock path" in caplog.text and reason in caplog.text
    assert torch.equal(encoder.encode(tokens), _stock(model, tokens))


def test_training_mode_and_disabled_fast_path_use_stock(tokens):
    model = _tiny()
    assert TextEncoder(model, allow_fast=False).path is TextPath.STOCK
    encoder = TextEncoder(model)
    model.train()
    try:
        assert torch.equal(encoder.encode(tokens), _stock(model, tokens))
    finally:
        model.eval()
    assert TextEncoder(model.train()).path is TextPath.STOCK


def test_empty_input(tiny_model):
    assert tiny_model.encode_text([]).shape == (0, TINY_MODEL_CONFIG["embed_dim"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_agrees_with_stock_fp32(tiny_spec, tiny_model, precision):
    """Fast path under autocast vs stock fp32; the stock path at the same precision as a yardstick."""
    low = load_model(tiny_spec, "cpu", precision)
    assert low.text_path is TextPath.FAST
    ref = tiny_model.encode_text(PROMPTS)
    fast_cos = (low.encode_text(PROMPTS) * ref).sum(1).min()
    low.text_encoder = TextEncoder(low.model, allow_fast=False)
    stock_cos = (low.encode_text(PROMPTS) * ref).sum(1).min()
    assert fast_cos >= LOW_PRECISION_MIN_COSINE, f"{precision}: fast {fast_cos:.6f}, stock {stock_cos:.6f}"
    assert fast_cos >= stock_cos - 1e-3, f"{precision}: fast {fast_cos:.6f}, stock {stock_cos:.6f}"


def test_benchmark_reports_rates_and_agreement(tiny_model):
    prompts = [render(t, n) for t in PAPER_TEMPLATES[:4] for n in NAMES]
    result = benchmark_text_encoder(tiny_model.model, tiny_model.tokenizer, prompts, batch_size=12, rounds=1)
    json.dumps(result)
    assert result["text_path"] == "fast" and result["prompts"] == len(prompts)
    res = result["results"]
    assert set(res) == {"stock_fp32", "fast_fp32", "stock_bf16", "fast_bf16"}
    assert all(r["prompts_per_s"] > 0 for r in res.values())
    assert res["stock_fp32"]["speedup_vs_stock_fp32"] == 1.0
    assert res["fast_fp32"]["vs_stock_fp32"]["max_abs_diff"] <= FP32_ATOL
    assert res["fast_bf16"]["vs_stock_fp32"]["min_cosine"] >= LOW_PRECISION_MIN_COSINE
    with pytest.raises(ValueError, match="fp32"):
        benchmark_text_encoder(tiny_model.model, tiny_model.tokenizer, prompts, precisions=("bf16",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_cuda_matches_stock(tiny_spec, tokens):
    gpu = load_model(tiny_spec, "cuda", "fp32")
    assert gpu.text_path is TextPath.FAST
    ref = _stock(gpu.model, tokens.cuda())
    assert _max_abs(gpu.text_encoder.encode(tokens), ref) <= FP32_ATOL
    with torch.autocast("cuda", dtype=torch.float16):
        half = gpu.text_encoder.encode(tokens)
    cos = F.cosine_similarity(half.float(), ref.float()).min()
    assert cos >= LOW_PRECISION_MIN_COSINE

"""Hyperparameter loading: required keys, llama.cpp defaults, per-arch semantics."""

from __future__ import annotations

import math
from typing import Any

import pytest

from worker.errors import ModelLoadError
from worker.gguf.hparams import SUPPORTED_ARCHS, load_hparams, required_keys


def _md(arch: str, **extra: Any) -> dict[str, Any]:
    md: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.context_length": 4096,
        f"{arch}.embedding_length": 64,
        f"{arch}.block_count": 4,
        f"{arch}.attention.head_count": 4,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.attention.layer_norm_epsilon": 1e-5,
        f"{arch}.vocab_size": 100,
        f"{arch}.expert_feed_forward_length": 32,
        f"{arch}.expert_count": 8,
        f"{arch}.expert_used_count": 4,
        f"{arch}.attention.sliding_window": 128,
    }
    md.update(extra)
    return md


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_every_required_key_is_enforced(arch: str) -> None:
    md = _md(arch)
    load_hparams(md)
    for key in required_keys(arch):
        broken = dict(md)
        del broken[key]
        with pytest.raises(ModelLoadError) as err:
            load_hparams(broken)
        assert key in str(err.value)


def test_unknown_arch_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'"):
        load_hparams({"general.architecture": "mamba"})
    with pytest.raises(ValueError):
        required_keys("mamba")


def test_defaults_follow_llama_cpp() -> None:
    hp = load_hparams(_md("llama"))
    assert hp.n_head_kv == hp.n_head == 4
    assert hp.head_dim == hp.head_dim_v == 16
    assert hp.rope.type == "normal"
    assert hp.rope.theta == 10000.0
    assert hp.rope.n_dims == 16
    assert hp.rope.scaling == "none" and hp.rope.freq_scale == 1.0
    assert hp.norm == "rms" and hp.norm_eps == pytest.approx(1e-5)
    assert hp.swa_layers == () and not hp.has_sinks


def test_rope_types_per_arch() -> None:
    kinds = {a: load_hparams(_md(a)).rope.type for a in SUPPORTED_ARCHS}
    assert kinds == {
        "qwen2": "neox",
        "phi3": "neox",
        "gpt-oss": "neox",
        "llama": "normal",
        "gpt2": "none",
    }
    g = load_hparams(_md("gpt2"))
    assert g.norm == "layer" and g.learned_pos


def test_gpt_oss_swa_pattern_and_yarn() -> None:
    md = _md(
        "gpt-oss",
        **{
            "gpt-oss.attention.head_count_kv": 2,
            "gpt-oss.attention.key_length": 32,
            "gpt-oss.rope.scaling.type": "yarn",
            "gpt-oss.rope.scaling.factor": 32.0,
            "gpt-oss.rope.scaling.original_context_length": 4096,
            "gpt-oss.rope.freq_base": 150000.0,
        },
    )
    hp = load_hparams(md)
    assert hp.swa_layers == (True, False, True, False)
    assert hp.is_swa(0) and not hp.is_swa(1)
    assert hp.sliding_window == 128
    assert hp.head_dim == 32 and hp.q_dim == 128 and hp.kv_dim == 64
    assert hp.rope.scaling == "yarn" and hp.rope.freq_scale == pytest.approx(1 / 32)
    assert hp.rope.yarn_ext_factor == 1.0
    assert hp.rope.yarn_mscale == pytest.approx(1 + 0.1 * math.log(32))
    assert hp.has_sinks  # gpt-oss always has sinks when no tensor table is known
    assert (hp.n_expert, hp.n_expert_used, hp.n_ff_exp) == (8, 4, 32)


def test_tensor_table_flags() -> None:
    names = ["token_embd.weight", "blk.0.attn_q.weight"]
    hp = load_hparams(_md("qwen2"), tensor_names=names)
    assert hp.tied_embeddings
    hp = load_hparams(_md("qwen2"), tensor_names=[*names, "output.weight"])
    assert not hp.tied_embeddings
    hp = load_hparams(
        _md("phi3"), tensor_names=[*names, "rope_factors_long.weight", "rope_factors_short.weight"]
    )
    assert hp.rope.has_factors


def test_vocab_from_tokenizer_list_and_bad_values() -> None:
    md = _md("qwen2")
    del md["qwen2.vocab_size"]
    md["tokenizer.ggml.tokens"] = ["a", "b", "c"]
    assert load_hparams(md).n_vocab == 3
    del md["tokenizer.ggml.tokens"]
    with pytest.raises(ModelLoadError, match="vocab_size"):
        load_hparams(md)
    with pytest.raises(ModelLoadError, match="head_count_kv"):
        load_hparams(_md("qwen2", **{"qwen2.attention.head_count_kv": 3}))
    with pytest.raises(ModelLoadError, match="not an integer"):
        load_hparams(_md("qwen2", **{"qwen2.block_count": "many"}))

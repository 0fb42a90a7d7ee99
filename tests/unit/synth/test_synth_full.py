"""Full-size layouts. The Qwen2.5 file is generated and compared with the real Qwen2.5-Coder
0.5B Q4_K_M file tensor by tensor; the phi3 and gpt-oss plans are checked against the sizes
llama.cpp reports for the real files (462.96 MiB, 2.23 GiB, 11.27 GiB)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from tools.synth import plan, preset, write_synthetic
from worker.gguf.reader import open_gguf


def test_full_sizes_match_llama_bench_model_sizes() -> None:
    qwen = plan(preset("qwen2", "full", mix="q4_k_m"))
    assert round(sum(t.nbytes for t in qwen) / 2**20, 2) == 462.96
    phi3 = plan(preset("phi3", "full", mix="q4_k_m"))
    assert round(sum(t.nbytes for t in phi3) / 2**30, 2) == 2.23
    oss = plan(preset("gpt-oss", "full"))
    assert round(sum(t.nbytes for t in oss) / 2**30, 2) == 11.27


def test_full_gpt_oss_mxfp4_type_counts() -> None:
    tensors = plan(preset("gpt-oss", "full", mix="mxfp4"))
    counts = Counter(t.qtype for t in tensors)
    # the real gpt-oss-20b-mxfp4.gguf: 459 tensors, f32 289, q8_0 98, mxfp4 72
    assert len(tensors) == 459
    assert counts == {T.F32: 289, T.Q8_0: 98, T.MXFP4: 72}
    exps = [t for t in tensors if t.name == "blk.0.ffn_down_exps.weight"]
    assert exps[0].shape == (2880, 2880, 32)


def test_full_phi3_q4_k_m_mix() -> None:
    tensors = {t.name: t for t in plan(preset("phi3", "full"))}
    assert len(tensors) == 2 + 1 + 32 * 6
    assert tensors["output.weight"].qtype == T.Q6_K
    assert tensors["token_embd.weight"].qtype == T.Q4_K
    assert all(tensors[f"blk.{i}.attn_qkv.weight"].qtype == T.Q5_K for i in range(32))
    assert tensors["blk.0.attn_qkv.weight"].shape == (3072, 9216)
    assert tensors["blk.0.ffn_up.weight"].shape == (3072, 16384)
    down = Counter(tensors[f"blk.{i}.ffn_down.weight"].qtype for i in range(32))
    assert down == {T.Q6_K: 16, T.Q4_K: 16}  # llama.cpp: 4 + 4 ends + 8 in between
    assert not any(n.startswith("rope_factors") for n in tensors)  # the 4k model has none


@pytest.mark.slow  # ~15 s alone, more on a busy 2-core machine
def test_full_qwen2_matches_the_real_file(real_qwen: Path, tmp_path: Path) -> None:
    path = tmp_path / "qwen2-full.gguf"
    report = write_synthetic(path, preset("qwen2", "full", mix="q4_k_m", seed=0))
    assert report.n_tensors == 291
    with open_gguf(real_qwen) as real, open_gguf(path) as syn:
        real_table = [(n, t.shape, t.ggml_type) for n, t in real.tensors.items()]
        syn_table = [(n, t.shape, t.ggml_type) for n, t in syn.tensors.items()]
        assert syn_table == real_table  # names, shapes, types and order
        assert syn.total_tensor_bytes() == real.total_tensor_bytes()
        for key in [
            "general.architecture", "general.file_type", "general.quantization_version",
            "qwen2.block_count", "qwen2.context_length", "qwen2.embedding_length",
            "qwen2.feed_forward_length", "qwen2.attention.head_count",
            "qwen2.attention.head_count_kv", "qwen2.rope.freq_base",
            "qwen2.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.add_bos_token",
        ]:  # fmt: skip
            assert syn.metadata[key] == real.metadata[key], key
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            assert len(syn.metadata[key]) == len(real.metadata[key]), key
        assert (
            syn.metadata["tokenizer.ggml.token_type"] == real.metadata["tokenizer.ggml.token_type"]
        )
        specials = slice(151643, 151665)
        assert (
            syn.metadata["tokenizer.ggml.tokens"][specials]
            == (real.metadata["tokenizer.ggml.tokens"][specials])
        )
        # one tensor of every type dequantizes to sane values
        for name in ("token_embd.weight", "output.weight", "blk.0.ffn_down.weight",
                     "blk.3.ffn_down.weight", "blk.5.attn_norm.weight"):  # fmt: skip
            x = syn.dequantize(name)
            assert np.isfinite(x).all()
            if "norm" in name:
                assert abs(float(x.mean()) - 1) < 0.01
            else:
                assert 0.015 < float(x.std()) < 0.025

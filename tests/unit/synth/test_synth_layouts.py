"""Tiny synthetic models of every architecture and several mixes: written, read back through
both gguf.GGUFReader and our own reader, and checked against layouts and type mixes written
out independently here (from the real models' structure and llama.cpp's rules)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from tools.synth import SynthError, SynthSpec, plan, preset, write_synthetic
from worker.gguf.hparams import load_hparams
from worker.gguf.reader import open_gguf

ARCHS = ["qwen2", "phi3", "gpt-oss", "llama", "gpt2"]


def expected_shapes(s: SynthSpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> ggml shape, from each architecture's structure."""
    E, V, L = s.n_embd, s.n_vocab, s.n_layer
    q, kv, F = s.n_head * s.head_dim, s.n_head_kv * s.head_dim, s.n_ff
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    if s.arch != "llama":  # Llama-3.2-1B ties its output to the embeddings
        out["output.weight"] = (E, V)
    if s.arch == "llama":
        out["rope_freqs.weight"] = (s.head_dim // 2,)
    if s.arch == "gpt2":
        out["position_embd.weight"] = (E, s.n_ctx)
        out["output_norm.bias"] = (E,)
    for i in range(L):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = (E,)
        if s.arch == "gpt2":
            out.update({
                b + "attn_norm.bias": (E,),
                b + "attn_qkv.weight": (E, 3 * E), b + "attn_qkv.bias": (3 * E,),
                b + "attn_output.weight": (E, E), b + "attn_output.bias": (E,),
                b + "ffn_norm.weight": (E,), b + "ffn_norm.bias": (E,),
                b + "ffn_up.weight": (E, F), b + "ffn_up.bias": (F,),
                b + "ffn_down.weight": (F, E), b + "ffn_down.bias": (E,),
            })  # fmt: skip
        elif s.arch == "phi3":
            out.update({
                b + "attn_qkv.weight": (E, 3 * q),
                b + "attn_output.weight": (q, E),
                b + "ffn_norm.weight": (E,),
                b + "ffn_up.weight": (E, 2 * F),
                b + "ffn_down.weight": (F, E),
            })  # fmt: skip
        else:
            out.update({
                b + "attn_q.weight": (E, q), b + "attn_k.weight": (E, kv),
                b + "attn_v.weight": (E, kv), b + "attn_output.weight": (q, E),
            })  # fmt: skip
            if s.arch in ("qwen2", "gpt-oss"):
                out.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,),
                            b + "attn_v.bias": (kv,)})  # fmt: skip
            if s.arch == "gpt-oss":
                X, Fe = s.n_expert, s.n_ff_exp
                out.update({
                    b + "attn_output.bias": (E,), b + "attn_sinks.weight": (s.n_head,),
                    b + "post_attention_norm.weight": (E,),
                    b + "ffn_gate_inp.weight": (E, X), b + "ffn_gate_inp.bias": (X,),
                    b + "ffn_gate_exps.weight": (E, Fe, X), b + "ffn_gate_exps.bias": (Fe, X),
                    b + "ffn_up_exps.weight": (E, Fe, X), b + "ffn_up_exps.bias": (Fe, X),
                    b + "ffn_down_exps.weight": (Fe, E, X), b + "ffn_down_exps.bias": (E, X),
                })  # fmt: skip
            else:
                out.update({
                    b + "ffn_norm.weight": (E,), b + "ffn_gate.weight": (E, F),
                    b + "ffn_up.weight": (E, F), b + "ffn_down.weight": (F, E),
                })  # fmt: skip
    return out


def always_f32(name: str, shape: tuple[int, ...]) -> bool:
    return (
        len(shape) == 1
        or name.endswith(".bias")
        or "ffn_gate_inp" in name
        or name == "position_embd.weight"
    )


# Tiny Q4_K_M layouts, written out by hand from llama.cpp's rules. With 2 layers, llama.cpp's
# "more bits" layers (first/last eighth, every third between) are {1}: layer 1's attn_v and
# ffn_down get Q6_K, layer 0's Q4_K. Rows that are not a multiple of 256 (qwen2 448,
# gpt-oss 288) fall back Q4_K->Q5_0 and Q6_K->Q8_0, exactly as in the real Qwen2.5 file.
TINY_Q4_K_M: dict[str, dict[str, T]] = {
    "qwen2": {
        "token_embd.weight": T.Q5_0, "output.weight": T.Q8_0,
        "blk.0.attn_q.weight": T.Q5_0, "blk.0.attn_k.weight": T.Q5_0,
        "blk.0.attn_v.weight": T.Q5_0, "blk.1.attn_v.weight": T.Q8_0,
        "blk.0.attn_output.weight": T.Q5_0, "blk.1.attn_output.weight": T.Q5_0,
        "blk.0.ffn_gate.weight": T.Q5_0, "blk.1.ffn_up.weight": T.Q5_0,
        "blk.0.ffn_down.weight": T.Q4_K, "blk.1.ffn_down.weight": T.Q6_K,
    },
    "phi3": {
        "token_embd.weight": T.Q4_K, "output.weight": T.Q6_K,
        "blk.0.attn_qkv.weight": T.Q5_K, "blk.1.attn_qkv.weight": T.Q5_K,
        "blk.0.attn_output.weight": T.Q4_K, "blk.0.ffn_up.weight": T.Q4_K,
        "blk.0.ffn_down.weight": T.Q4_K, "blk.1.ffn_down.weight": T.Q6_K,
    },
    "llama": {
        "token_embd.weight": T.Q6_K,  # no output.weight: the embeddings are the LM head
        "blk.0.attn_q.weight": T.Q4_K, "blk.0.attn_k.weight": T.Q4_K,
        "blk.0.attn_v.weight": T.Q4_K, "blk.1.attn_v.weight": T.Q6_K,
        "blk.0.ffn_gate.weight": T.Q4_K, "blk.0.ffn_down.weight": T.Q4_K,
        "blk.1.ffn_down.weight": T.Q6_K,
    },
    "gpt2": {
        "token_embd.weight": T.Q4_K, "output.weight": T.Q6_K,
        "position_embd.weight": T.F32,
        "blk.0.attn_qkv.weight": T.Q5_K, "blk.0.attn_output.weight": T.Q4_K,
        "blk.0.ffn_up.weight": T.Q4_K, "blk.0.ffn_down.weight": T.Q4_K,
        "blk.1.ffn_down.weight": T.Q6_K,
    },
    "gpt-oss": {
        "token_embd.weight": T.Q5_0, "output.weight": T.Q8_0,
        "blk.0.attn_q.weight": T.Q5_0, "blk.0.attn_v.weight": T.Q5_0,
        "blk.1.attn_v.weight": T.Q8_0,
        "blk.0.attn_output.weight": T.Q4_K,  # its rows are q_dim = 512 long
        "blk.0.ffn_gate_exps.weight": T.MXFP4, "blk.1.ffn_down_exps.weight": T.MXFP4,
        "blk.0.ffn_gate_inp.weight": T.F32,
    },
}  # fmt: skip


def expected_type(arch: str, mix: str, name: str, shape: tuple[int, ...]) -> T | None:
    """None: not pinned down by this table (checked by the plan comparison instead)."""
    if always_f32(name, shape):
        return T.F32
    if mix == "q4_k_m":
        return TINY_Q4_K_M[arch].get(name)
    if mix == "mxfp4":
        return T.MXFP4 if "_exps" in name else T.Q8_0
    single = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q4_0": T.Q4_0, "q8_0": T.Q8_0,
              "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}  # fmt: skip
    if mix in single:
        return single[mix]
    k = {"q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}[mix]
    if shape[0] % 256 == 0:
        return k
    return {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}[k]


CASES = [
    (arch, mix)
    for arch in ARCHS
    for mix in ["q4_k_m", "q4_0", "f32", "f16"] + (["mxfp4"] if arch == "gpt-oss" else [])
] + [("llama", m) for m in ("q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "bf16")]
CASES += [("qwen2", "q6_k")]  # K-quant fallbacks on 448-wide rows


@pytest.mark.parametrize(("arch", "mix"), CASES)
def test_tiny_layout_roundtrip(arch: str, mix: str, tmp_path: Path) -> None:
    spec = preset(arch, "tiny", mix=mix, seed=11)
    path = tmp_path / f"{arch}-{mix}.gguf"
    report = write_synthetic(path, spec)
    shapes = expected_shapes(spec)

    reader = gguf.GGUFReader(path)
    got = {t.name: (tuple(int(x) for x in t.shape), T(t.tensor_type)) for t in reader.tensors}
    assert set(got) == set(shapes)
    assert report.n_tensors == len(shapes)
    for name, (shape, qtype) in got.items():
        assert shape == shapes[name], name
        want = expected_type(arch, mix, name, shape)
        if want is not None:
            assert qtype == want, (name, qtype.name, want.name)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["general.file_type"].contents() == {
        "q4_k_m": 15, "q4_0": 2, "f32": 0, "f16": 1, "mxfp4": 38, "q4_1": 3, "q5_0": 8,
        "q5_1": 9, "q8_0": 7, "q4_k": 14, "q5_k": 16, "q6_k": 18, "bf16": 32,
    }[mix]  # fmt: skip

    # byte accounting of the report matches the file
    assert sum(report.bytes_by_type.values()) == report.tensor_bytes
    assert report.file_bytes == path.stat().st_size

    # our reader agrees, and every tensor dequantizes to sane values
    with open_gguf(path) as gf:
        assert gf.architecture == arch
        for name, (_shape, qtype) in got.items():
            x = gf.dequantize(name)
            assert x.dtype == np.float32 and np.isfinite(x).all(), name
            if name.endswith("norm.weight"):
                assert abs(float(x.mean()) - 1.0) < 0.05, name
            elif name.endswith(".bias"):
                assert abs(float(x.mean())) < 0.01 and float(x.std()) < 0.05, name
            elif "rope_freqs" in name or "attn_sinks" in name:
                pass
            else:
                assert abs(float(x.mean())) < 0.003, name
                assert 0.012 < float(x.std()) < 0.03, (name, qtype.name, float(x.std()))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_hparams_and_tokenizer_load(arch: str, tmp_path: Path) -> None:
    from worker.tokenizer.gguf_bpe import GGUFTokenizer

    spec = preset(arch, "tiny", mix="q8_0")
    path = tmp_path / "m.gguf"
    write_synthetic(path, spec)
    with open_gguf(path) as gf:
        hp = load_hparams(gf)
        md = dict(gf.metadata)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim) == (
        spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv, spec.head_dim,
    )  # fmt: skip
    assert hp.n_vocab == spec.n_vocab and hp.n_ctx_train == spec.n_ctx
    assert hp.tied_embeddings == (arch == "llama")
    assert hp.learned_pos == (arch == "gpt2")
    assert hp.norm == ("layer" if arch == "gpt2" else "rms")
    if arch == "gpt-oss":
        assert (hp.n_expert, hp.n_expert_used, hp.n_ff_exp) == (4, 2, spec.n_ff_exp)
        assert hp.n_expert_used < hp.n_expert
        assert hp.sliding_window == 16 and hp.swa_layers == (True, False)
        assert hp.has_sinks
        assert hp.rope.scaling == "yarn" and hp.rope.factor == 32.0
        assert hp.rope.orig_ctx == 4096 and hp.rope.theta == 150000.0
    else:
        assert hp.n_ff == spec.n_ff

    tok = GGUFTokenizer(md, source=path)
    assert tok.vocab_size == spec.n_vocab
    text = "Hello world, the quick brown fox 123 éà\n"
    ids = tok.encode(text, add_special=False)
    assert ids and all(0 <= i < spec.n_vocab for i in ids)
    assert tok.decode(ids) == text
    if arch != "gpt2":  # GPT-2 has no chat template, like the real model
        prompt = tok.render_chat([{"role": "user", "content": "hi"}])
        assert "hi" in prompt
        chat_ids = tok.encode(prompt, add_special=True, parse_special=True)
        specials = {"qwen2": "<|im_start|>", "phi3": "<|user|>", "llama": "<|start_header_id|>",
                    "gpt-oss": "<|start|>"}  # fmt: skip
        assert md["tokenizer.ggml.tokens"].index(specials[arch]) in chat_ids


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_synthetic(a, preset("gpt-oss", "tiny", mix="mxfp4", seed=5))
    write_synthetic(b, preset("gpt-oss", "tiny", mix="mxfp4", seed=5))
    write_synthetic(c, preset("gpt-oss", "tiny", mix="mxfp4", seed=6))
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == c.stat().st_size and a.read_bytes() != c.read_bytes()


def test_f16_and_f32_mixes_hold_the_same_model_exactly(tmp_path: Path) -> None:
    """f32 files are exact reference weights; the f16 file of the same seed is a different
    draw, but each stores exactly what it claims (F16 values round-trip bit-exactly)."""
    spec = preset("qwen2", "tiny", mix="f16", seed=3)
    path = tmp_path / "h.gguf"
    write_synthetic(path, spec)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert T(t.tensor_type) == T.F16
    raw = np.asarray(t.data).view(np.float16)
    with open_gguf(path) as gf:
        np.testing.assert_array_equal(
            gf.dequantize("blk.0.attn_q.weight").ravel(), raw.astype(np.float32).ravel()
        )


def test_scaled_overrides(tmp_path: Path) -> None:
    spec = preset("qwen2", "tiny").scaled(n_layer=3, n_vocab=1000, n_ff=256)
    assert spec.size == "custom"
    names = [t.name for t in plan(spec)]
    assert "blk.2.ffn_down.weight" in names and "blk.3.attn_q.weight" not in names
    report = write_synthetic(tmp_path / "s.gguf", spec)
    assert report.n_vocab == 1000
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 1000


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        ("gpt-oss", {"n_expert_used": 4}, "expert_used_count"),
        ("qwen2", {"n_head_kv": 3}, "multiple of n_head_kv"),
        ("gpt2", {"n_head": 8}, "n_embd"),
        ("phi3", {"n_head_kv": 4}, "multi-head"),
        ("phi3", {"n_vocab": 300}, "normal tokens"),
        ("qwen2", {"n_vocab": 270}, "normal tokens"),
        ("gpt2", {"n_tok_normal": 600}, "cannot hold"),
    ],
)
def test_invalid_specs_are_rejected(arch: str, overrides: dict[str, int], message: str) -> None:
    with pytest.raises(SynthError, match=message):
        plan(preset(arch, "tiny").scaled(**overrides))


def test_mxfp4_mix_is_gpt_oss_only() -> None:
    with pytest.raises(SynthError, match="gpt-oss only"):
        preset("llama", "tiny", mix="mxfp4")


def test_phi3_rope_factor_tensors(tmp_path: Path) -> None:
    spec = preset("phi3", "tiny", mix="f16").scaled(rope_factors=True)
    write_synthetic(tmp_path / "p.gguf", spec)
    with open_gguf(tmp_path / "p.gguf") as gf:
        for kind in ("long", "short"):
            f = gf.dequantize(f"rope_factors_{kind}.weight")
            assert f.shape[-1] == spec.head_dim // 2 and (f >= 1.0).all()


def test_llama3_rope_freqs_values(tmp_path: Path) -> None:
    """rope_freqs are llama-3's frequency divisors: 1 for the high-frequency dims, the
    scaling factor (32) for the low-frequency ones, smooth and increasing in between."""
    write_synthetic(tmp_path / "l.gguf", preset("llama", "full").scaled(n_layer=1, n_vocab=400))
    with open_gguf(tmp_path / "l.gguf") as gf:
        f = gf.dequantize("rope_freqs.weight").ravel()
    assert f.size == 32
    assert f[0] == 1.0 and f[-1] == 32.0
    assert (np.diff(f) >= 0).all()
    assert ((f > 1.0) & (f < 32.0)).any()


def test_progress_and_no_partial_file_on_failure(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = write_synthetic(
        tmp_path / "ok.gguf", preset("phi3", "tiny"), progress=lambda d, t: seen.append((d, t))
    )
    assert len(seen) == report.n_tensors and seen[-1] == (report.tensor_bytes,) * 2

    def boom(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "bad.gguf", preset("phi3", "tiny"), progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]

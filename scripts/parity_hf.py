#!/usr/bin/env python
"""The transformers side of the parity checks: a GGUF file -> the equivalent Hugging Face
model (float64 by default, eager attention), teacher-forced logits.

The GGUF tensors are dequantized to float32 (worker.gguf.reader) and loaded into
Qwen2ForCausalLM / Phi3ForCausalLM / GptOssForCausalLM / LlamaForCausalLM /
GPT2LMHeadModel, undoing what llama.cpp's converter (convert_hf_to_gguf.py) does to HF
checkpoints:
- every 2-D weight: GGUF NumPy shape [out, in] == nn.Linear.weight (no transpose);
  GPT-2's Conv1D stores [in, out]: transposed;
- llama: q/k rows were permuted per head so NORMAL RoPE (adjacent pairs) equals HF's
  rotate_half; undone here (row 2i+j of a head goes back to j*d/2 + i);
- gpt-oss: experts ffn_{gate,up,down}_exps [E, out, in] go back to gate_up_proj
  [E, in, 2*ff] with gate/up interleaved (gate at even columns) and down_proj [E, ff, in];
  attn_sinks -> self_attn.sinks; YaRN with truncate=True (llama.cpp floors/ceils the
  correction range);
- phi3: rope_factors_short/long -> longrope short_factor/long_factor with the attention
  factor the GGUF carries.

Usage (writes an .npz with `ids` and `logits` [T, vocab] float64):
    .venv/bin/python scripts/parity_hf.py MODEL.gguf --ids 1,2,3 --out ref.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.gguf.hparams import HParams, load_hparams
from worker.gguf.reader import GGUFFile, open_gguf

_EAGER: dict[str, Any] = {"attn_implementation": "eager"}
_EAGER_EXPERTS: dict[str, Any] = {"experts_implementation": "eager"}


def unpermute_llama(w: npt.NDArray[Any], n_head: int) -> npt.NDArray[Any]:
    """Inverse of llama.cpp's `permute` of q/k rows (NORMAL rope -> HF rotate_half)."""
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).copy()


def permute_llama(w: npt.NDArray[Any], n_head: int) -> npt.NDArray[Any]:
    """llama.cpp's converter permutation (HF rotate_half layout -> adjacent pairs)."""
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).copy()


def _rope_parameters(hp: HParams, gf: GGUFFile) -> dict[str, Any]:
    r = hp.rope
    if r.scaling == "yarn":
        return {
            "rope_type": "yarn",
            "rope_theta": r.theta,
            "factor": r.factor,
            "original_max_position_embeddings": r.orig_ctx,
            "beta_fast": r.yarn_beta_fast,
            "beta_slow": r.yarn_beta_slow,
            "attention_factor": r.yarn_mscale,
            "truncate": r.yarn_truncate,
        }
    if r.scaling == "linear":
        return {"rope_type": "linear", "rope_theta": r.theta, "factor": r.factor}
    if hp.arch == "phi3" and "rope_factors_short.weight" in gf.tensors:
        return {
            "rope_type": "longrope",
            "rope_theta": r.theta,
            "short_factor": gf.dequantize("rope_factors_short.weight").tolist(),
            "long_factor": gf.dequantize("rope_factors_long.weight").tolist(),
            "attention_factor": r.yarn_attn_factor,
            "original_max_position_embeddings": r.orig_ctx,
        }
    return {"rope_type": "default", "rope_theta": r.theta}


def hf_config_and_state(gf: GGUFFile) -> tuple[Any, dict[str, npt.NDArray[Any]], str]:
    """(transformers config, state dict of float32 arrays, model class name)."""
    import transformers as tf

    if int(tf.__version__.split(".")[0]) < 5:
        # The configs below use transformers 5's `rope_parameters`; 4.x would silently
        # ignore them and run with default RoPE.
        raise RuntimeError(f"parity needs transformers >= 5, found {tf.__version__}")

    hp = load_hparams(gf)
    t = {name: gf.dequantize(name) for name in gf.tensors}
    tied = "output.weight" not in t
    sd: dict[str, npt.NDArray[Any]] = {}
    common: dict[str, Any] = {
        "vocab_size": hp.n_vocab,
        "hidden_size": hp.n_embd,
        "num_hidden_layers": hp.n_layer,
        "num_attention_heads": hp.n_head,
        "max_position_embeddings": hp.n_ctx_train,
        "tie_word_embeddings": tied,
        "attn_implementation": "eager",
    }
    L = hp.n_layer
    if hp.arch in ("qwen2", "llama", "phi3", "gpt-oss"):
        sd["model.embed_tokens.weight"] = t["token_embd.weight"]
        sd["model.norm.weight"] = t["output_norm.weight"]
        sd["lm_head.weight"] = t["token_embd.weight"] if tied else t["output.weight"]
        for i in range(L):
            b, m = f"blk.{i}", f"model.layers.{i}"
            sd[f"{m}.input_layernorm.weight"] = t[f"{b}.attn_norm.weight"]
            post = "post_attention_norm" if hp.arch == "gpt-oss" else "ffn_norm"
            sd[f"{m}.post_attention_layernorm.weight"] = t[f"{b}.{post}.weight"]
            sd[f"{m}.self_attn.o_proj.weight"] = t[f"{b}.attn_output.weight"]
            if f"{b}.attn_output.bias" in t:
                sd[f"{m}.self_attn.o_proj.bias"] = t[f"{b}.attn_output.bias"]
            if hp.arch == "phi3":
                sd[f"{m}.self_attn.qkv_proj.weight"] = t[f"{b}.attn_qkv.weight"]
            else:
                for x in "qkv":
                    w = t[f"{b}.attn_{x}.weight"]
                    bias = t.get(f"{b}.attn_{x}.bias")
                    if hp.arch == "llama" and x in "qk":
                        nh = hp.n_head if x == "q" else hp.n_head_kv
                        w = unpermute_llama(w, nh)
                        bias = None if bias is None else unpermute_llama(bias, nh)
                    sd[f"{m}.self_attn.{x}_proj.weight"] = w
                    if bias is not None:
                        sd[f"{m}.self_attn.{x}_proj.bias"] = bias
            if hp.arch == "phi3":
                sd[f"{m}.mlp.gate_up_proj.weight"] = t[f"{b}.ffn_up.weight"]
                sd[f"{m}.mlp.down_proj.weight"] = t[f"{b}.ffn_down.weight"]
            elif hp.arch == "gpt-oss":
                sd[f"{m}.self_attn.sinks"] = t[f"{b}.attn_sinks.weight"]
                sd[f"{m}.mlp.router.weight"] = t[f"{b}.ffn_gate_inp.weight"]
                sd[f"{m}.mlp.router.bias"] = t[f"{b}.ffn_gate_inp.bias"]
                g, u = t[f"{b}.ffn_gate_exps.weight"], t[f"{b}.ffn_up_exps.weight"]
                e, ff, hid = g.shape
                gu = np.empty((e, hid, 2 * ff), np.float32)
                gu[:, :, 0::2] = g.transpose(0, 2, 1)
                gu[:, :, 1::2] = u.transpose(0, 2, 1)
                gub = np.empty((e, 2 * ff), np.float32)
                gub[:, 0::2] = t[f"{b}.ffn_gate_exps.bias"]
                gub[:, 1::2] = t[f"{b}.ffn_up_exps.bias"]
                sd[f"{m}.mlp.experts.gate_up_proj"] = gu
                sd[f"{m}.mlp.experts.gate_up_proj_bias"] = gub
                sd[f"{m}.mlp.experts.down_proj"] = t[f"{b}.ffn_down_exps.weight"].transpose(0, 2, 1)
                sd[f"{m}.mlp.experts.down_proj_bias"] = t[f"{b}.ffn_down_exps.bias"]
            else:
                for x in ("gate", "up", "down"):
                    sd[f"{m}.mlp.{x}_proj.weight"] = t[f"{b}.ffn_{x}.weight"]
    rope = _rope_parameters(hp, gf)
    cfg: Any
    if hp.arch == "qwen2":
        cfg = tf.Qwen2Config(
            **common,
            intermediate_size=hp.n_ff,
            num_key_value_heads=hp.n_head_kv,
            rms_norm_eps=hp.norm_eps,
            rope_parameters=rope,
            use_sliding_window=False,
        )
        return cfg, sd, "Qwen2ForCausalLM"
    if hp.arch == "llama":
        cfg = tf.LlamaConfig(
            **common,
            intermediate_size=hp.n_ff,
            num_key_value_heads=hp.n_head_kv,
            head_dim=hp.head_dim,
            rms_norm_eps=hp.norm_eps,
            rope_parameters=rope,
            attention_bias="blk.0.attn_q.bias" in t,
        )
        return cfg, sd, "LlamaForCausalLM"
    if hp.arch == "phi3":
        cfg = tf.Phi3Config(
            **common,
            intermediate_size=hp.n_ff,
            num_key_value_heads=hp.n_head_kv,
            rms_norm_eps=hp.norm_eps,
            rope_parameters=rope,
            original_max_position_embeddings=hp.rope.orig_ctx,
            sliding_window=None,
            pad_token_id=0,
        )
        return cfg, sd, "Phi3ForCausalLM"
    if hp.arch == "gpt-oss":
        cfg = tf.GptOssConfig(
            **common,
            intermediate_size=hp.n_ff_exp,
            num_key_value_heads=hp.n_head_kv,
            head_dim=hp.head_dim,
            num_local_experts=hp.n_expert,
            num_experts_per_tok=hp.n_expert_used,
            sliding_window=hp.sliding_window,
            layer_types=[
                "sliding_attention" if hp.is_swa(i) else "full_attention" for i in range(L)
            ],
            rms_norm_eps=hp.norm_eps,
            rope_parameters=rope,
            attention_bias=True,
            # the per-expert loop; grouped_mm has no float64
            **_EAGER_EXPERTS,
        )
        return cfg, sd, "GptOssForCausalLM"
    if hp.arch == "gpt2":
        sd["transformer.wte.weight"] = t["token_embd.weight"]
        sd["transformer.wpe.weight"] = t["position_embd.weight"]
        sd["transformer.ln_f.weight"] = t["output_norm.weight"]
        sd["transformer.ln_f.bias"] = t["output_norm.bias"]
        sd["lm_head.weight"] = t["token_embd.weight"] if tied else t["output.weight"]
        for i in range(L):
            b, m = f"blk.{i}", f"transformer.h.{i}"
            for src, dst in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                sd[f"{m}.{dst}.weight"] = t[f"{b}.{src}.weight"]
                sd[f"{m}.{dst}.bias"] = t[f"{b}.{src}.bias"]
            for src, dst in (
                ("attn_qkv", "attn.c_attn"),
                ("attn_output", "attn.c_proj"),
                ("ffn_up", "mlp.c_fc"),
                ("ffn_down", "mlp.c_proj"),
            ):
                sd[f"{m}.{dst}.weight"] = t[f"{b}.{src}.weight"].T.copy()  # Conv1D: [in, out]
                sd[f"{m}.{dst}.bias"] = t[f"{b}.{src}.bias"]
        cfg = tf.GPT2Config(
            vocab_size=hp.n_vocab,
            n_positions=hp.n_ctx_train,
            n_embd=hp.n_embd,
            n_layer=L,
            n_head=hp.n_head,
            n_inner=hp.n_ff,
            activation_function="gelu_new",
            layer_norm_epsilon=hp.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=tied,
            **_EAGER,
        )
        return cfg, sd, "GPT2LMHeadModel"
    raise ValueError(f"no transformers mapping for {hp.arch!r}")


def build_hf_model(gf: GGUFFile, dtype: str = "float64") -> Any:
    import torch
    import transformers as tf

    cfg, sd, cls_name = hf_config_and_state(gf)
    try:  # every parameter is overwritten below: skip the (slow) random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = getattr(tf, cls_name)(cfg)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied heads share storage with the embedding; anything else missing is a mapping bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if "rope_freqs.weight" in gf.tensors:
        # llama.cpp stores Llama-3 style rope scaling as per-pair frequency divisors; HF's
        # rotary module takes them as a scaled inverse-frequency table.
        rot = model.model.rotary_emb
        factors = torch.from_numpy(gf.dequantize("rope_freqs.weight")).to(rot.inv_freq.dtype)
        rot.inv_freq = rot.original_inv_freq / factors[: rot.inv_freq.shape[0]]
    model = model.to(getattr(torch, dtype)).eval()
    return model


def hf_logits(model: Any, ids: list[int]) -> npt.NDArray[np.float64]:
    """Teacher-forced logits [len(ids), vocab] of one sequence (no cache, one pass)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].double().numpy()


def hf_logits_for_file(path: str | Path, ids: list[int], dtype: str = "float64") -> np.ndarray:
    with open_gguf(path) as gf:
        model = build_hf_model(gf, dtype)
    return hf_logits(model, ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    logits = hf_logits_for_file(args.model, ids, args.dtype)
    np.savez_compressed(args.out, ids=np.array(ids), logits=logits)
    print(f"wrote {args.out}: logits {logits.shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

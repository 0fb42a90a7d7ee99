"""Synthetic tokenizer metadata: internally consistent (every merge's parts and result are
tokens, ids unique, special ids in range and naming the right tokens), and at full size the
real models' vocabulary sizes and special-token ids."""

from __future__ import annotations

import pytest

from tools.synth import make_vocab, preset
from tools.synth_vocab import Vocab, bytes_to_unicode, check_vocab

# token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Full-size facts of the real tokenizers: (n_vocab, {id: token}, bos, eos, pad, pre)
REAL = {
    "qwen2": (
        151936,
        {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
         151657: "<tool_call>", 151664: "<|file_sep|>", 151665: "[PAD151665]",
         151935: "[PAD151935]"},
        151643, 151645, 151643, "qwen2",
    ),
    "gpt-oss": (
        201088,
        {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>",
         200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>",
         200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
         201087: "<|reserved_201087|>"},
        199998, 200002, 199999, "gpt-4o",
    ),
    "llama": (
        128256,
        {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
         128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
         128010: "<|python_tag|>", 128011: "<|reserved_special_token_3|>",
         128255: "<|reserved_special_token_247|>"},
        128000, 128009, None, "llama-bpe",
    ),
    "gpt2": (50257, {50256: "<|endoftext|>"}, 50256, 50256, None, "gpt-2"),  # llama.cpp: "gpt-2"
    "phi3": (
        32064,
        {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<0x00>", 258: "<0xFF>", 32000: "<|endoftext|>",
         32001: "<|assistant|>", 32006: "<|system|>", 32007: "<|end|>", 32010: "<|user|>",
         32011: "[PAD32011]", 32063: "[PAD32063]"},
        1, 32000, 32000, None,
    ),
}  # fmt: skip


def common_checks(v: Vocab) -> None:
    assert check_vocab(v) == []
    assert len(set(v.tokens)) == len(v.tokens)
    assert len(v.token_types) == len(v.tokens)
    assert set(v.token_types) <= {NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE}
    for tid in (v.bos_id, v.eos_id, v.pad_id, v.unk_id):
        assert tid is None or 0 <= tid < len(v)
    if v.model == "gpt2":
        # 256 byte-level tokens first, in GPT-2 byte order, then one token per merge
        assert v.tokens[:256] == [c for _, c in bytes_to_unicode()]
        n_normal = next(i for i, t in enumerate(v.token_types) if t != NORMAL)
        assert all(t != NORMAL for t in v.token_types[n_normal:])
        assert len(v.merges) == n_normal - 256
        index = {t: i for i, t in enumerate(v.tokens)}
        for rank, m in enumerate(v.merges):
            a, b = m.split(" ")
            # parts exist before the merge that produces their concatenation
            assert index[a + b] == 256 + rank
            assert index[a] < index[a + b] and index[b] < index[a + b]
        assert v.scores is None
    else:
        assert v.model == "llama" and v.scores is not None
        assert v.tokens[:3] == ["<unk>", "<s>", "</s>"]
        assert v.token_types[:3] == [UNKNOWN, CONTROL, CONTROL]
        assert v.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
        assert v.token_types[3:259] == [BYTE] * 256
        pieces = [t for t, ty in zip(v.tokens, v.token_types, strict=True) if ty == NORMAL]
        assert "\u2581" in pieces
        assert any(p.startswith("\u2581") and len(p) > 2 for p in pieces)
        # every multi-character piece can be reached by merging two shorter pieces
        piece_set = set(pieces)
        for p in pieces:
            if len(p) > 1:
                assert any(p[:k] in piece_set and p[k:] in piece_set for k in range(1, len(p)))


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt-oss", "llama", "gpt2"])
def test_tiny_vocab_consistent(arch: str) -> None:
    spec = preset(arch, "tiny")
    v = make_vocab(spec)
    assert len(v) == spec.n_vocab
    common_checks(v)
    assert v.eos_id is not None and v.tokens[v.eos_id] == {
        "qwen2": "<|im_end|>", "phi3": "<|endoftext|>", "gpt-oss": "<|return|>",
        "llama": "<|eot_id|>", "gpt2": "<|endoftext|>",
    }[arch]  # fmt: skip
    assert (v.chat_template is None) == (arch == "gpt2")


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt-oss", "llama", "gpt2"])
def test_full_vocab_matches_real_model(arch: str) -> None:
    n_vocab, tokens, bos, eos, pad, pre = REAL[arch]
    v = make_vocab(preset(arch, "full"))
    assert len(v) == n_vocab
    for tid, text in tokens.items():
        assert v.tokens[tid] == text, tid
    assert (v.bos_id, v.eos_id, v.pad_id, v.pre) == (bos, eos, pad, pre)
    common_checks(v)
    if arch == "qwen2":
        # the real file: 151387 merges, 20 control + 2 user-defined + 271 unused
        assert len(v.merges) == 151387
        assert v.token_types.count(CONTROL) == 20 and v.token_types.count(USER) == 2
        assert v.token_types.count(UNUSED) == 271
        assert v.add_bos is False
    if arch in ("llama", "phi3"):
        assert v.add_bos is True
    if arch == "phi3":
        assert v.unk_id == 0


def test_merge_ranks_follow_creation() -> None:
    v = make_vocab(preset("gpt2", "tiny"))
    # a merge never uses a token that only a later merge creates
    created = {t: i for i, t in enumerate(v.tokens)}
    for rank, m in enumerate(v.merges):
        a, b = m.split(" ")
        assert max(created[a], created[b]) < 256 + rank


def test_check_vocab_reports_problems() -> None:
    v = make_vocab(preset("qwen2", "tiny"))
    v.merges.append("zzq qqz")
    v.eos_id = len(v.tokens)
    problems = check_vocab(v)
    assert any("not a token" in p for p in problems)
    assert any("eos_id" in p for p in problems)

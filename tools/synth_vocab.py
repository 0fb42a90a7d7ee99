"""Synthetic tokenizer metadata for the synthetic-model writer.

Two families, as in llama.cpp's GGUF files:

* byte-level BPE (`tokenizer.ggml.model = "gpt2"`; qwen2, llama-3, gpt-oss, gpt2): the 256
  byte-unicode tokens first (in GPT-2's byte-to-unicode order), then one token per merge
  (`"a b"` creates `"ab"`, both parts made earlier, so every token is reachable by BPE), then
  the model's special tokens at their real ids, then the model's padding/reserved tokens.
* SentencePiece (`"llama"`; phi3): `<unk>`, `<s>`, `</s>`, the 256 `<0xXX>` byte-fallback
  tokens, `▁`-style pieces with decreasing scores (each piece is an earlier piece plus one
  character, so SPM merging can reach it), then the added tokens and `[PAD…]` padding.

Merged text is drawn from letters, digits, spaces and some punctuation with a fixed seed, so
the vocabulary is deterministic and looks like a real one (`Ġthe`, `▁in`...). It is not a
trained vocabulary: tokenization is valid but not frequency-optimal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf.constants import TokenType


def bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's reversible byte -> printable character map, in its canonical order:
    printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    pairs = [(b, chr(b)) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            pairs.append((b, chr(256 + extra)))
            extra += 1
    return pairs


@dataclass
class Vocab:
    """Everything that goes under `tokenizer.ggml.*` (plus the chat template)."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------
# Merge/piece generation


def _grow(
    base: list[str], units: list[str], prefix: str, n_new: int, seed: int, max_len: int
) -> list[tuple[str, str]]:
    """Create `n_new` new strings, each a merge of two existing ones: either `a + unit` (`a`
    any earlier string, `unit` a letter-weighted character) or `prefix + a` (a word start,
    like `Ġthe`). The prefix only ever appears first. Returns the (left, right) pairs in
    creation order."""
    rng = np.random.default_rng(seed)
    have = list(base)
    seen = set(have)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_new:
        batch = max(1024, 2 * (n_new - len(pairs)))
        ua = rng.random(batch)
        ub = rng.integers(0, len(units), batch)
        up = rng.random(batch)
        uc = rng.integers(0, len(units), batch)
        n_base = len(base)
        for k in range(batch):
            # Start from a letter-weighted unit or from an earlier merge result, favouring
            # earlier (shorter, "more frequent") ones: index ~ n * u^2.
            if len(have) == n_base or up[k] > 0.6:
                a = units[int(uc[k])]
            else:
                a = have[n_base + int((len(have) - n_base) * ua[k] ** 1.5)]
            if up[k] < 0.3:
                if a.startswith(prefix):
                    continue
                left, right = prefix, a
            else:
                left, right = a, units[int(ub[k])]
            s = left + right
            if len(s) > max_len or s in seen:
                continue
            seen.add(s)
            have.append(s)
            pairs.append((left, right))
            if len(pairs) == n_new:
                break
    return pairs


def _weighted_units() -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    units: list[str] = []
    # frequency-ish weights: common letters appear more often in the unit list
    for i, c in enumerate(letters):
        units += [c] * max(1, 8 - i // 3)
    units += list("ETAOINSHRDLCUMWFGYPBVKJXQZ") + list("0123456789")
    units += list(".,;:_-()[]{}<>=+*/'\"!?#")
    return units


_ACCENTED = "éèàáâêôüöäïçñíóúß"


def bpe_vocab(
    n_normal: int,
    specials: list[tuple[str, int]],
    *,
    pre: str,
    seed: int,
    fill: tuple[str, int] | None = None,
    n_vocab: int | None = None,
) -> Vocab:
    """A byte-level BPE vocabulary: `n_normal` normal tokens (256 bytes + merges), then the
    `specials` (text, token type), then `fill` entries (format with `{id}`) up to `n_vocab`."""
    if n_normal < 256:
        raise ValueError("a byte-level BPE vocabulary needs at least the 256 byte tokens")
    byte_chars = [c for _, c in bytes_to_unicode()]
    to_char = dict(bytes_to_unicode())
    units = [to_char[ord(c)] for c in _weighted_units()] + [to_char[ord("\n")]] * 2
    # The first merges join the two UTF-8 bytes of common accented letters (as real byte-level
    # vocabularies do, e.g. "Ã ©" -> "Ã©" for é), so tokens also span multi-byte characters.
    first = [(to_char[ch.encode()[0]], to_char[ch.encode()[1]]) for ch in _ACCENTED]
    first = first[: n_normal - 256]
    joined = [a + b for a, b in first]
    pairs = first + _grow(
        byte_chars + joined,
        units + joined,
        to_char[ord(" ")],
        n_normal - 256 - len(first),
        seed,
        max_len=16,
    )
    tokens = byte_chars + [a + b for a, b in pairs]
    merges = [f"{a} {b}" for a, b in pairs]
    types = [int(TokenType.NORMAL)] * len(tokens)
    for text, ttype in specials:
        tokens.append(text)
        types.append(ttype)
    total = n_vocab if n_vocab is not None else len(tokens)
    if total < len(tokens):
        raise ValueError(f"vocabulary of {total} cannot hold {len(tokens)} tokens")
    if fill is None and total > len(tokens):
        raise ValueError("vocabulary padding needs a fill pattern")
    while len(tokens) < total:
        assert fill is not None
        tokens.append(fill[0].format(id=len(tokens)))
        types.append(fill[1])
    return Vocab(model="gpt2", tokens=tokens, token_types=types, pre=pre, merges=merges)


def spm_vocab(
    n_pieces_total: int,
    added: list[tuple[str, int]],
    n_vocab: int,
    *,
    seed: int,
) -> Vocab:
    """A SentencePiece vocabulary with byte fallback: ids 0-2 `<unk>`, `<s>`, `</s>`, ids
    3-258 `<0x00>`..`<0xFF>`, pieces up to `n_pieces_total`, then `added`, then `[PAD{id}]`."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(int(TokenType.BYTE))
        scores.append(0.0)
    n_pieces = n_pieces_total - len(tokens)
    if n_pieces < 1:
        raise ValueError("SPM vocabulary too small for its byte tokens")
    sp = "\u2581"  # ▁, SentencePiece's space
    units = _weighted_units()
    singles = [sp, *dict.fromkeys(units)]  # every character a merge can append
    if n_pieces < len(singles):
        raise ValueError(f"SPM vocabulary needs at least {len(singles) + 259} pieces")
    grown = _grow(singles, units, sp, n_pieces - len(singles), seed, max_len=16)
    pieces = singles + [a + b for a, b in grown]
    # Multi-character pieces rank by creation order; the single characters score lowest
    # among the normal pieces, as in real SPM models.
    n_multi = len(grown)
    for k, p in enumerate(pieces):
        tokens.append(p)
        types.append(int(TokenType.NORMAL))
        scores.append(-float(n_multi + k) if k < len(singles) else -float(k - len(singles)))
    for text, ttype in added:
        tokens.append(text)
        types.append(ttype)
        scores.append(0.0)
    if n_vocab < len(tokens):
        raise ValueError(f"vocabulary of {n_vocab} cannot hold {len(tokens)} tokens")
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(int(TokenType.UNUSED))
        scores.append(-1000.0)
    return Vocab(model="llama", tokens=tokens, token_types=types, scores=scores)


# ---------------------------------------------------------------------------------------------
# Per-architecture tokenizers (special tokens at the real models' ids when full size)

_C = int(TokenType.CONTROL)
_U = int(TokenType.USER_DEFINED)
_UNUSED = int(TokenType.UNUSED)

QWEN2_SPECIALS: list[tuple[str, int]] = [
    ("<|endoftext|>", _C),
    ("<|im_start|>", _C),
    ("<|im_end|>", _C),
    ("<|object_ref_start|>", _C),
    ("<|object_ref_end|>", _C),
    ("<|box_start|>", _C),
    ("<|box_end|>", _C),
    ("<|quad_start|>", _C),
    ("<|quad_end|>", _C),
    ("<|vision_start|>", _C),
    ("<|vision_end|>", _C),
    ("<|vision_pad|>", _C),
    ("<|image_pad|>", _C),
    ("<|video_pad|>", _C),
    ("<tool_call>", _U),
    ("</tool_call>", _U),
    ("<|fim_prefix|>", _C),
    ("<|fim_middle|>", _C),
    ("<|fim_suffix|>", _C),
    ("<|fim_pad|>", _C),
    ("<|repo_name|>", _C),
    ("<|file_sep|>", _C),
]

LLAMA3_SPECIALS: list[tuple[str, int]] = [
    ("<|begin_of_text|>", _C),
    ("<|end_of_text|>", _C),
    ("<|reserved_special_token_0|>", _C),
    ("<|reserved_special_token_1|>", _C),
    ("<|finetune_right_pad_id|>", _C),
    ("<|reserved_special_token_2|>", _C),
    ("<|start_header_id|>", _C),
    ("<|end_header_id|>", _C),
    ("<|eom_id|>", _C),
    ("<|eot_id|>", _C),
    ("<|python_tag|>", _C),
]

# o200k_harmony: ids 199998.. in the real vocabulary; gaps are <|reserved_{id}|>.
GPT_OSS_SPECIALS: list[tuple[str, int]] = [
    ("<|startoftext|>", _C),
    ("<|endoftext|>", _C),
    ("<|reserved_{id}|>", _C),
    ("<|reserved_{id}|>", _C),
    ("<|return|>", _C),
    ("<|constrain|>", _C),
    ("<|reserved_{id}|>", _C),
    ("<|channel|>", _C),
    ("<|start|>", _C),
    ("<|end|>", _C),
    ("<|message|>", _C),
    ("<|reserved_{id}|>", _C),
    ("<|reserved_{id}|>", _C),
    ("<|reserved_{id}|>", _C),
    ("<|call|>", _C),
]

PHI3_ADDED: list[tuple[str, int]] = [
    ("<|endoftext|>", _C),
    ("<|assistant|>", _C),
    ("<|placeholder1|>", _C),
    ("<|placeholder2|>", _C),
    ("<|placeholder3|>", _C),
    ("<|placeholder4|>", _C),
    ("<|system|>", _C),
    ("<|end|>", _C),
    ("<|placeholder5|>", _C),
    ("<|placeholder6|>", _C),
    ("<|user|>", _C),
]

QWEN2_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for m in rest %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PHI3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}"
    "{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

GPT_OSS_TEMPLATE = (
    "{{- '<|start|>system<|message|>You are a helpful assistant.\\n"
    "Reasoning: medium\\n\\n# Valid channels: analysis, commentary, final. "
    "Channel must be included for every message.<|end|>' }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' or m['role'] == 'developer' %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + m['content'] + '<|end|>' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m['content'] + '<|end|>' }}"
    "{%- else %}"
    "{{- '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)


def min_normal_tokens(model: str) -> int:
    """The smallest normal-token count a vocabulary of this tokenizer model can have: the 256
    byte tokens (BPE), or the 3 control + 256 byte tokens and one piece per character (SPM)."""
    if model == "gpt2":
        return 256
    return 3 + 256 + 1 + len(dict.fromkeys(_weighted_units()))


def _fill_specials(specials: list[tuple[str, int]], first_id: int) -> list[tuple[str, int]]:
    return [(t.format(id=first_id + k), ty) for k, (t, ty) in enumerate(specials)]


def vocab_for(arch: str, n_vocab: int, n_normal: int) -> Vocab:
    """The tokenizer of `arch` with `n_vocab` tokens of which `n_normal` are normal
    (BPE: bytes + merges; SPM: control + byte + pieces). Full-size values reproduce the real
    models' sizes and special-token ids exactly."""
    if arch == "qwen2":
        v = bpe_vocab(
            n_normal,
            QWEN2_SPECIALS,
            pre="qwen2",
            seed=2,
            fill=("[PAD{id}]", _UNUSED),
            n_vocab=n_vocab,
        )
        eot = n_normal
        v.bos_id, v.eos_id, v.pad_id = eot, n_normal + 2, eot
        v.add_bos = False
        v.chat_template = QWEN2_TEMPLATE
    elif arch == "llama":
        v = bpe_vocab(
            n_normal,
            LLAMA3_SPECIALS,
            pre="llama-bpe",
            seed=3,
            fill=("<|reserved_special_token_{id}|>", _C),
            n_vocab=n_vocab,
        )
        # reserved tokens after <|python_tag|> are numbered from 3, as in Llama 3.1/3.2
        first_fill = n_normal + len(LLAMA3_SPECIALS)
        for i in range(first_fill, n_vocab):
            v.tokens[i] = f"<|reserved_special_token_{i - first_fill + 3}|>"
        v.bos_id, v.eos_id = n_normal, n_normal + 9
        v.add_bos = True
        v.chat_template = LLAMA3_TEMPLATE
    elif arch == "gpt-oss":
        v = bpe_vocab(
            n_normal,
            _fill_specials(GPT_OSS_SPECIALS, n_normal),
            pre="gpt-4o",
            seed=4,
            fill=("<|reserved_{id}|>", _C),
            n_vocab=n_vocab,
        )
        v.bos_id, v.eos_id, v.pad_id = n_normal, n_normal + 4, n_normal + 1
        v.chat_template = GPT_OSS_TEMPLATE
    elif arch == "gpt2":
        v = bpe_vocab(n_normal, [("<|endoftext|>", _C)], pre="gpt-2", seed=5, n_vocab=n_vocab)
        v.bos_id = v.eos_id = n_normal
    elif arch == "phi3":
        v = spm_vocab(n_normal, PHI3_ADDED, n_vocab, seed=6)
        v.unk_id, v.bos_id, v.eos_id, v.pad_id = 0, 1, n_normal, n_normal
        v.add_bos, v.add_eos = True, False
        v.chat_template = PHI3_TEMPLATE
    else:
        raise ValueError(f"no tokenizer for architecture {arch!r}")
    if len(v) != n_vocab:
        raise AssertionError(f"{arch}: built {len(v)} tokens, wanted {n_vocab}")
    return v


def check_vocab(v: Vocab) -> list[str]:
    """Internal consistency problems of a vocabulary (empty list when consistent)."""
    problems: list[str] = []
    index = {t: i for i, t in enumerate(v.tokens)}
    if len(index) != len(v.tokens):
        problems.append("duplicate token strings")
    if len(v.token_types) != len(v.tokens):
        problems.append("token_type length differs from tokens")
    if v.scores is not None and len(v.scores) != len(v.tokens):
        problems.append("scores length differs from tokens")
    for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
        tid = getattr(v, name)
        if tid is not None and not 0 <= tid < len(v.tokens):
            problems.append(f"{name} {tid} out of range")
    for rank, m in enumerate(v.merges):
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            problems.append(f"merge {rank} {m!r} is not two parts")
            continue
        a, b = parts
        ia, ib, iab = index.get(a), index.get(b), index.get(a + b)
        if ia is None or ib is None or iab is None:
            problems.append(f"merge {rank} {m!r}: part or result is not a token")
        if len(problems) > 20:
            break
    return problems

"""`gguf-bpe`: the tokenizer described by a GGUF file's metadata (docs/design.md).

Two vocabulary kinds, as `tokenizer.ggml.model` names them:
- `gpt2`: byte-level BPE with a merge list and a named pre-tokenizer (`tokenizer.ggml.pre`:
  qwen2, llama-bpe, gpt-4o, gpt2 ...).
- `llama`: SentencePiece-style BPE (Llama 2, Phi-3): pieces with scores, merged best score
  first, a '▁' for every space and one in front of the text, byte fallback (`<0xNN>`) for
  characters without a piece.

The merge loop runs in the `tokenizers` library (Rust): we build its BPE model from the
metadata (for `llama`, the merge order follows the piece scores), put the named regex
pre-tokenizer or the SentencePiece space handling in front, and register control and
user-defined tokens as whole-token matches. Decoding, special-token policy, BOS/EOS and
end-of-generation rules are ours and follow llama.cpp's.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from loguru import logger
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers.models import BPE

from worker.tokenizer.chat import ChatTemplate
from worker.tokenizer.common import (
    ALWAYS_RENDERED,
    TO_LATIN1,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    VALID_TOKEN_TYPES,
    MetadataReader,
    TokenTable,
    byte_level_to_bytes,
    bytes_to_byte_level,
    eog_ids,
)
from worker.tokenizer.pretok import PRETOKENIZERS, PreTokenizer

SPM_SPACE = "\u2581"  # '▁'
_SUPPORTED_MODELS = ("gpt2", "llama")


def _byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


class GGUFTokenizer(TokenTable):
    """A `Tokenizer` (worker/tokenizer/base.py) built from GGUF tokenizer metadata."""

    kind = "gguf-bpe"

    def __init__(self, metadata: Mapping[str, Any], *, source: object = "<metadata>") -> None:
        md = MetadataReader(metadata, source)
        self.source = source
        model = md.string("tokenizer.ggml.model")
        if model is None:
            raise md.fail("metadata tokenizer.ggml.model is missing: no tokenizer in this file")
        if model not in _SUPPORTED_MODELS:
            raise md.fail(
                f"tokenizer model {model!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_MODELS)})"
            )
        self.model = model

        tokens = md.str_list("tokenizer.ggml.tokens")
        if not tokens:
            raise md.fail("metadata tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        types = md.int_list("tokenizer.ggml.token_type")
        if types is None:
            types = [TOKEN_NORMAL] * n
        if len(types) != n:
            raise md.fail(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        bad = next((i for i, t in enumerate(types) if t not in VALID_TOKEN_TYPES), None)
        if bad is not None:
            raise md.fail(f"tokenizer.ggml.token_type[{bad}] = {types[bad]} is not a token type")
        scores = md.float_list("tokenizer.ggml.scores")
        if scores is not None and len(scores) != n:
            raise md.fail(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        self.tokens = tokens
        self.types = types
        self.vocab_size = n

        # Special ids and flags, with llama.cpp's defaults per vocabulary kind.
        spm = model == "llama"
        self.bos_id = md.token_id("tokenizer.ggml.bos_token_id", n)
        self.eos_id = md.token_id("tokenizer.ggml.eos_token_id", n)
        self.unk_id = md.token_id("tokenizer.ggml.unknown_token_id", n)
        self.pad_id = md.token_id("tokenizer.ggml.padding_token_id", n)
        eot = md.token_id("tokenizer.ggml.eot_token_id", n)
        eom = md.token_id("tokenizer.ggml.eom_token_id", n)
        fim = [md.token_id(f"tokenizer.ggml.fim_{k}_token_id", n) for k in ("pad", "rep", "sep")]
        if spm:
            self.bos_id = 1 if self.bos_id is None and n > 1 else self.bos_id
            self.eos_id = 2 if self.eos_id is None and n > 2 else self.eos_id
            self.unk_id = 0 if self.unk_id is None else self.unk_id

        pre_name: str | None = None
        pre: PreTokenizer | None = None
        if not spm:
            pre_name = md.string("tokenizer.ggml.pre")
            if pre_name is None or pre_name == "default":
                logger.warning(
                    "{}: no tokenizer.ggml.pre in the metadata; using the gpt2 pre-tokenizer",
                    source,
                )
                pre_name = "gpt2"
            pre = PRETOKENIZERS.get(pre_name)
            if pre is None:
                raise md.fail(
                    f"pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported "
                    f"(supported: {', '.join(sorted(PRETOKENIZERS))})"
                )
        self.pre = pre_name

        default_add_bos = spm or (pre is not None and pre.ignore_merges)  # llama.cpp: SPM, Llama 3
        self.add_bos = md.flag("tokenizer.ggml.add_bos_token", default_add_bos)
        self.add_eos = md.flag("tokenizer.ggml.add_eos_token", False)
        self.add_space_prefix = md.flag("tokenizer.ggml.add_space_prefix", spm)
        if self.add_bos and self.bos_id is None:
            raise md.fail("tokenizer.ggml.add_bos_token is set but there is no BOS token")
        if self.add_eos and self.eos_id is None:
            raise md.fail("tokenizer.ggml.add_eos_token is set but there is no EOS token")

        # First id of each text (a vocabulary may hold a text twice).
        self._token_to_id: dict[str, int] = dict(
            zip(reversed(tokens), range(n - 1, -1, -1), strict=False)
        )

        # Rendering of each token, and which tokens are matched whole in text.
        self._special = [t in (TOKEN_CONTROL, TOKEN_USER_DEFINED) for t in types]
        self._pieces: list[bytes] = self._all_piece_bytes()
        self._visible: list[bool] = [
            t not in (TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_UNKNOWN) for t in types
        ]
        for text in ALWAYS_RENDERED:
            tid = self._token_to_id.get(text)
            if tid is not None:
                self._visible[tid] = True
        self._eog = eog_ids(tokens, [self.eos_id, eot, eom, *fim])

        self._core = self._build_core(md, spm, pre, scores, parse_special=True)
        self._core_plain: tokenizers.Tokenizer | None = None
        self._md = md
        self._spm_scores = scores
        self._pretok = pre

        template = md.string("tokenizer.chat_template")
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(
                template,
                bos_token=tokens[self.bos_id] if self.bos_id is not None else "",
                eos_token=tokens[self.eos_id] if self.eos_id is not None else "",
            )
            if template
            else None
        )

    # --- construction ---------------------------------------------------------------

    def _all_piece_bytes(self) -> list[bytes]:
        if self.model == "gpt2":
            # Fast path: every byte-level character is one byte, so translate the whole
            # vocabulary at once and cut it at the token lengths.
            blob_text = "".join(self.tokens).translate(TO_LATIN1)
            try:
                blob = blob_text.encode("latin-1")
            except UnicodeEncodeError:
                blob = b""
            if blob:
                ends = list(itertools.accumulate(map(len, self.tokens)))
                starts = [0, *ends[:-1]]
                plain = (TOKEN_NORMAL, TOKEN_BYTE, 0)
                return [
                    blob[a:b] if typ in plain else tok.encode("utf-8")
                    for a, b, typ, tok in zip(starts, ends, self.types, self.tokens, strict=True)
                ]
        return [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        tok, typ = self.tokens[i], self.types[i]
        if typ in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN, TOKEN_UNUSED):
            return tok.encode("utf-8")
        if self.model == "llama":
            if typ == TOKEN_BYTE:
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                    try:
                        return bytes([int(tok[3:5], 16)])
                    except ValueError:
                        pass
                raise self._md_fail(f"byte token {i} is {tok!r}, expected <0xNN>")
            return tok.replace(SPM_SPACE, " ").encode("utf-8")
        return byte_level_to_bytes(tok)

    def _md_fail(self, problem: str) -> Exception:
        from worker.errors import ModelLoadError

        return ModelLoadError(self.source, problem)

    def _vocab_dict(self) -> dict[str, int]:
        return self._token_to_id

    def _build_core(
        self,
        md: MetadataReader,
        spm: bool,
        pre: PreTokenizer | None,
        scores: list[float] | None,
        *,
        parse_special: bool,
    ) -> tokenizers.Tokenizer:
        vocab = self._vocab_dict()
        if spm:
            model = self._spm_model(md, vocab, scores)
        else:
            assert pre is not None
            model = self._byte_level_model(md, vocab, pre)
        core = tokenizers.Tokenizer(model)
        if spm:
            steps: list[normalizers.Normalizer] = []
            if self.add_space_prefix:
                steps.append(normalizers.Prepend(SPM_SPACE))
            steps.append(normalizers.Replace(" ", SPM_SPACE))
            core.normalizer = normalizers.Sequence(steps)
        else:
            assert pre is not None
            core.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    *(
                        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False)
                        for rx in pre.regexes
                    ),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        # Whole-token matches: user-defined tokens always, control tokens when asked.
        whole: list[AddedToken] = []
        for i, t in enumerate(self.tokens):
            typ = self.types[i]
            if t and (typ == TOKEN_USER_DEFINED or (parse_special and typ == TOKEN_CONTROL)):
                whole.append(AddedToken(t, special=typ == TOKEN_CONTROL, normalized=False))
        if whole:
            core.add_tokens(whole)
        return core

    def _byte_level_model(
        self, md: MetadataReader, vocab: dict[str, int], pre: PreTokenizer
    ) -> BPE:
        raw = md.str_list("tokenizer.ggml.merges")
        if raw is None:
            raise md.fail("byte-level BPE vocabulary without tokenizer.ggml.merges")
        merges: list[tuple[str, str]] = [tuple(m.split(" ", 1)) for m in raw]  # type: ignore[misc]
        if any(len(p) != 2 or not p[0] for p in merges):
            merges = [self._split_merge(md, k, m) for k, m in enumerate(raw)]
        lacking = [b for b in range(256) if bytes_to_byte_level(bytes([b])) not in vocab]
        if lacking:
            raise md.fail(
                f"byte-level vocabulary has no token for {len(lacking)} byte values "
                f"(first: 0x{lacking[0]:02X})"
            )
        try:
            return BPE(vocab, merges, ignore_merges=pre.ignore_merges)
        except Exception as exc:  # the library checks every merge; name the bad one
            for k, (a, b) in enumerate(merges):
                missing = next((x for x in (a, b, a + b) if x not in vocab), None)
                if missing is not None:
                    raise md.fail(
                        f"tokenizer.ggml.merges[{k}] = {raw[k]!r} refers to {missing!r}, "
                        "which is not in the vocabulary"
                    ) from exc
            raise md.fail(f"cannot build the BPE model: {exc}") from exc

    @staticmethod
    def _split_merge(md: MetadataReader, k: int, m: str) -> tuple[str, str]:
        cut = m.find(" ", 1)  # a token may itself start with a space
        if cut < 0:
            raise md.fail(f"tokenizer.ggml.merges[{k}] = {m!r} is not 'left right'")
        return m[:cut], m[cut + 1 :]

    def _spm_model(
        self, md: MetadataReader, vocab: dict[str, int], scores: list[float] | None
    ) -> BPE:
        if scores is None:
            raise md.fail("SentencePiece vocabulary (model 'llama') without tokenizer.ggml.scores")
        types = self.types
        byte_ids = [i for i, t in enumerate(types) if t == TOKEN_BYTE]
        byte_fallback = bool(byte_ids)
        if byte_fallback:
            have = {self.tokens[i] for i in byte_ids}
            lacking = [b for b in range(256) if _byte_piece(b) not in have]
            if lacking:
                raise md.fail(
                    f"SentencePiece vocabulary has byte tokens but none for 0x{lacking[0]:02X}"
                )
        unk = self.tokens[self.unk_id] if self.unk_id is not None else None
        if not byte_fallback and unk is None:
            raise md.fail("SentencePiece vocabulary with neither byte tokens nor <unk>")
        # Merge order: the pair whose joined piece scores highest goes first (ties: lower
        # id). Every split of a piece into two mergeable pieces is a merge of that rank.
        mergeable = {t: i for i, t in enumerate(self.tokens) if types[i] in (TOKEN_NORMAL, 0)}
        ranked: list[tuple[float, int, int, str, str]] = []
        for piece, pid in mergeable.items():
            for cut in range(1, len(piece)):
                a, b = piece[:cut], piece[cut:]
                if a in mergeable and b in mergeable:
                    ranked.append((-scores[pid], pid, cut, a, b))
        ranked.sort()
        merges = [(a, b) for _, _, _, a, b in ranked]
        try:
            return BPE(
                vocab,
                merges,
                unk_token=unk,
                fuse_unk=False,
                byte_fallback=byte_fallback,
            )
        except Exception as exc:
            raise md.fail(f"cannot build the SentencePiece model: {exc}") from exc

    def _plain(self) -> tokenizers.Tokenizer:
        if self._core_plain is None:
            self._core_plain = self._build_core(
                self._md,
                self.model == "llama",
                self._pretok,
                self._spm_scores,
                parse_special=False,
            )
        return self._core_plain

    # --- the Tokenizer protocol -----------------------------------------------------

    def encode(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        core = self._core if parse_special else self._plain()
        ids: list[int] = []
        if text:
            # encode_batch_fast skips the offset bookkeeping we never use (2x faster).
            fast = getattr(core, "encode_batch_fast", None)
            if fast is not None:
                ids = fast([text], add_special_tokens=False)[0].ids
            else:
                ids = core.encode(text, add_special_tokens=False).ids
        if add_special:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return b"".join(self.iter_bytes(ids, skip_special=skip_special)).decode(
            "utf-8", errors="replace"
        )

    def iter_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> list[bytes]:
        """The bytes of each token as `decode` joins them (the SentencePiece space in
        front of a text fragment, which `encode` adds, taken off again)."""
        out: list[bytes] = []
        fragment_start = True
        for i in ids:
            piece = self.piece(i, fragment_start=fragment_start, skip_special=skip_special)
            shown = self._visible[i] or not skip_special
            fragment_start = self._special[i] or (
                fragment_start and not (shown and self._pieces[i])
            )
            out.append(piece)
        return out

    def piece(self, token_id: int, *, fragment_start: bool, skip_special: bool) -> bytes:
        self.check_id(token_id)
        if skip_special and not self._visible[token_id]:
            return b""
        p = self._pieces[token_id]
        if (
            fragment_start
            and self.add_space_prefix
            and not self._special[token_id]
            and p.startswith(b" ")
        ):
            return p[1:]
        return p

    def starts_fragment_after(self, token_id: int) -> bool:
        """Whether the text after this token is a new fragment (it is a whole-matched
        special token): `encode` then put a SentencePiece space in front of it."""
        return 0 <= token_id < self.vocab_size and self._special[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        self.check_id(token_id)
        return self._pieces[token_id] if self._visible[token_id] else b""

    def token_to_id(self, text: str) -> int | None:
        return self._token_to_id.get(text)

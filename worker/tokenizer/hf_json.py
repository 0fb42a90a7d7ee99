"""`hf-json`: a Hugging Face `tokenizer.json` (beside the model or given by --tokenizer),
run by the `tokenizers` library (docs/design.md). A `tokenizer_config.json` beside it may give the
chat template, BOS/EOS tokens, add_bos/add_eos and model_max_length; the GGUF metadata fills
what it leaves out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from worker.errors import ModelLoadError
from worker.tokenizer.chat import ChatTemplate
from worker.tokenizer.common import (
    ALWAYS_RENDERED,
    MetadataReader,
    TokenTable,
    byte_level_to_bytes,
    eog_ids,
)

_SPM_SPACE = "\u2581"
_HUGE = 10**12  # transformers writes 1e30 for "no limit"


def _token_content(v: object) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _chat_template_of(config: Mapping[str, Any]) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, str):
        return t
    if isinstance(t, list):  # [{"name": ..., "template": ...}]
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        d = named.get("default")
        return d if isinstance(d, str) else None
    return None


def _decoder_kinds(spec: object) -> set[str]:
    kinds: set[str] = set()
    if isinstance(spec, dict):
        if isinstance(spec.get("type"), str):
            kinds.add(spec["type"])
        for sub in spec.get("decoders") or []:
            kinds |= _decoder_kinds(sub)
    return kinds


class HFJsonTokenizer(TokenTable):
    kind = "hf-json"

    def __init__(self, path: Path, *, metadata: Mapping[str, Any] | None = None) -> None:
        self.source = path
        try:
            raw = path.read_text(encoding="utf-8")
            spec = json.loads(raw)
            self._core = tokenizers.Tokenizer.from_str(raw)
        except Exception as exc:  # unreadable file, bad JSON, or a spec the library rejects
            raise ModelLoadError(path, f"cannot load tokenizer.json: {exc}") from exc
        self._core_plain: tokenizers.Tokenizer | None = None
        self._raw = raw

        config: dict[str, Any] = {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                loaded = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(cfg_path, f"cannot read tokenizer_config.json: {exc}") from exc
            if isinstance(loaded, dict):
                config = loaded
        md = MetadataReader(metadata or {}, path)

        self.vocab_size = self._core.get_vocab_size(with_added_tokens=True)
        n = self.vocab_size
        self.tokens: list[str] = [self._core.id_to_token(i) or "" for i in range(n)]
        special_ids = {
            a.get("id")
            for a in spec.get("added_tokens") or []
            if isinstance(a, dict) and a.get("special")
        }
        self._special = [i in special_ids for i in range(n)]
        self._hidden = [
            self._special[i] and self.tokens[i] not in ALWAYS_RENDERED for i in range(n)
        ]
        added_ids = {a.get("id") for a in spec.get("added_tokens") or [] if isinstance(a, dict)}
        self._added = [i in added_ids for i in range(n)]

        def _id_of(name: str, md_key: str) -> int | None:
            content = _token_content(config.get(name))
            if content is not None:
                tid = self._core.token_to_id(content)
                if tid is not None:
                    return int(tid)
            return md.token_id(md_key, n) if metadata is not None else None

        self.bos_id = _id_of("bos_token", "tokenizer.ggml.bos_token_id")
        self.eos_id = _id_of("eos_token", "tokenizer.ggml.eos_token_id")

        # add_bos/add_eos: what the post-processor really does.
        probe = self._core.encode("a", add_special_tokens=True).ids
        bare = self._core.encode("a", add_special_tokens=False).ids
        self.add_bos = bool(probe) and len(probe) > len(bare) and probe[0] == self.bos_id
        self.add_eos = bool(probe) and len(probe) > len(bare) and probe[-1] == self.eos_id

        mml = config.get("model_max_length")
        self.model_max_length: int | None = (
            int(mml) if isinstance(mml, (int, float)) and 0 < mml < _HUGE else None
        )

        kinds = _decoder_kinds(spec.get("decoder"))
        self._byte_level = "ByteLevel" in kinds
        self._spm = bool(kinds & {"Metaspace", "ByteFallback", "Replace"}) and not self._byte_level
        self._pieces = [self._piece_bytes(i) for i in range(n)]
        self._strip_first_space = self._spm and bool(kinds & {"Strip", "Metaspace"})

        named = [self.eos_id]
        if metadata is not None:
            named += [
                md.token_id("tokenizer.ggml.eot_token_id", n),
                md.token_id("tokenizer.ggml.eom_token_id", n),
            ]
        self._eog = eog_ids((t if self._added[i] else "" for i, t in enumerate(self.tokens)), named)

        template = _chat_template_of(config) or md.string("tokenizer.chat_template")
        self.chat_template: ChatTemplate | None = (
            ChatTemplate(
                template,
                bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
                eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "",
            )
            if template
            else None
        )

    def _piece_bytes(self, i: int) -> bytes:
        t = self.tokens[i]
        if self._added[i]:
            return t.encode("utf-8")
        if self._byte_level:
            return byte_level_to_bytes(t)
        if self._spm:
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                try:
                    return bytes([int(t[3:5], 16)])
                except ValueError:
                    pass
            return t.replace(_SPM_SPACE, " ").encode("utf-8")
        return t.encode("utf-8")

    def _plain(self) -> tokenizers.Tokenizer:
        if self._core_plain is None:
            core = tokenizers.Tokenizer.from_str(self._raw)
            core.encode_special_tokens = True
            self._core_plain = core
        return self._core_plain

    def encode(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        core = self._core if parse_special else self._plain()
        return list(core.encode(text, add_special_tokens=add_special).ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return str(self._core.decode(list(ids), skip_special_tokens=skip_special))

    def piece(self, token_id: int, *, fragment_start: bool, skip_special: bool) -> bytes:
        self.check_id(token_id)
        if skip_special and self._hidden[token_id]:
            return b""
        p = self._pieces[token_id]
        if fragment_start and self._strip_first_space and p.startswith(b" "):
            return p[1:]  # as the decoder's Strip / Metaspace does at the start
        return p

    def starts_fragment_after(self, token_id: int) -> bool:
        """The leading-space rule of SentencePiece decoders applies once, at the start."""
        return False

    def token_bytes(self, token_id: int) -> bytes:
        return self.piece(token_id, fragment_start=False, skip_special=True)

    def token_to_id(self, text: str) -> int | None:
        tid = self._core.token_to_id(text)
        return None if tid is None else int(tid)

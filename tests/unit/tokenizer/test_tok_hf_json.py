"""hf-json: a tokenizer.json beside the model (or given) wins over the GGUF vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from worker.errors import ModelLoadError
from worker.tokenizer import StreamDecoder, load_tokenizer
from worker.tokenizer.hf_json import HFJsonTokenizer
from worker.tokenizer.pretok import GPT4O

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def _write_tokenizer_json(md: dict[str, Any], path: Path) -> None:
    """The o200k-style vocabulary as a Hugging Face tokenizer.json."""
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4O), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True) for i, t in enumerate(tokens) if types[i] == 3]
    )
    tok.save(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, o200k_metadata: dict[str, Any]) -> Path:
    d = tmp_path_factory.mktemp("hfjson")
    _write_tokenizer_json(o200k_metadata, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": {"content": "<|return|>", "special": True},
                "model_max_length": 131072,
                "chat_template": TEMPLATE,
            }
        )
    )
    return d


def test_beside_the_model_is_chosen(
    model_dir: Path, o200k_metadata: dict[str, Any], golden: Any
) -> None:
    tok = load_tokenizer(o200k_metadata, model_path=model_dir / "model.gguf")
    assert isinstance(tok, HFJsonTokenizer) and tok.kind == "hf-json"
    assert tok.vocab_size == len(o200k_metadata["tokenizer.ggml.tokens"])
    assert tok.bos_id == tok.token_to_id("<|endoftext|>")
    assert tok.eos_id == tok.token_to_id("<|return|>")
    assert tok.model_max_length == 131072
    assert (tok.add_bos, tok.add_eos) == (False, False)
    # Same vocabulary and split pattern: the tiktoken goldens hold through tokenizers too.
    for v in golden("gpt4o")["vectors"]:
        assert tok.encode(v["text"], add_special=False) == v["ids"]
        assert tok.decode(v["ids"]) == v["text"]
    # Harmony rules: <|return|> and <|call|> end generation, <|end|> does not.
    assert tok.is_eog(tok.token_to_id("<|return|>") or -1)
    assert tok.is_eog(tok.token_to_id("<|call|>") or -1)
    assert not tok.is_eog(tok.token_to_id("<|end|>") or -1)


def test_parse_special_and_stream(model_dir: Path) -> None:
    tok = load_tokenizer({}, tokenizer_json=model_dir / "tokenizer.json")
    end = tok.encode("<|end|>", add_special=False)
    assert len(end) == 1 and tok.token_bytes(end[0]) == b""
    start = tok.encode("<|start|>", add_special=False)
    assert len(start) == 1 and tok.token_bytes(start[0]) == b"<|start|>"  # harmony: shown
    plain = tok.encode("<|end|>", add_special=False, parse_special=False)
    assert len(plain) > 1 and tok.decode(plain) == "<|end|>"
    ids = tok.encode("añ 🦊 数", add_special=False)
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "añ 🦊 数"


def test_chat_template_from_config(model_dir: Path) -> None:
    tok = load_tokenizer({}, tokenizer_json=model_dir / "tokenizer.json")
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|endoftext|><|start|>user<|message|>hi<|end|><|start|>assistant"


def test_bad_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer({}, tokenizer_json=tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ModelLoadError, match=r"cannot load tokenizer\.json"):
        load_tokenizer({}, tokenizer_json=bad)
    # Beside a model, a broken tokenizer.json is an error too, not a silent fallback.
    with pytest.raises(ModelLoadError):
        load_tokenizer({}, model_path=tmp_path / "m.gguf")


def test_sentencepiece_style_tokenizer_json(
    tmp_path: Path, spm_metadata: dict[str, Any], golden: Any
) -> None:
    """A Llama-2-style tokenizer.json (Metaspace-like normalizer, byte fallback, a decoder
    that drops the leading space): decode and the stream agree, bytes split across <0xNN>
    tokens are held back."""
    from worker.tokenizer.gguf_bpe import GGUFTokenizer

    core = Tokenizer.from_str(GGUFTokenizer(spm_metadata)._core.to_str())
    core.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    path = tmp_path / "tokenizer.json"
    core.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    )
    tok = load_tokenizer(spm_metadata, model_path=tmp_path / "model.gguf")
    assert tok.kind == "hf-json" and tok.bos_id == 1
    for v in golden("spm")["vectors"][:45]:
        text = v["text"]
        if "<|" in text:
            continue
        assert tok.encode(text, add_special=False) == v["ids"]
        ids = [1, *v["ids"]]
        dec = StreamDecoder(tok, at_start=True)
        pushed = [dec.push(i) for i in ids]
        assert "".join(pushed) + dec.flush() == tok.decode(ids, skip_special=True) == text
        assert all("\ufffd" not in p for p in pushed)

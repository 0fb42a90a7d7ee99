"""The tokenizer interface every backend of worker/tokenizer implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    kind: str  # "gguf-bpe" | "hf-json"
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool

    def encode(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Text to ids. add_special: prepend BOS / append EOS as the model's flags say.
        parse_special: special/control tokens written in the text become their ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b'' for control tokens not rendered)."""
        ...

    def is_eog(self, token_id: int) -> bool:
        """End of generation: EOS, EOT and the like from the metadata."""
        ...

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str: ...

"""Streaming detokenizer (docs/design.md): token ids in, text out, only ever complete UTF-8.

Bytes of a code point split across tokens wait for the token that completes it; nothing is
lost: `flush()` at the end of the stream returns what is still held (an incomplete trailing
sequence becomes U+FFFD then, and only then). `text` is everything emitted so far, for
matching stop strings."""

from __future__ import annotations

import codecs

from worker.tokenizer.base import Tokenizer


class StreamDecoder:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special: bool = True,
        at_start: bool = False,
        after_token: int | None = None,
    ) -> None:
        """skip_special: control tokens add no text (as `token_bytes` says); with False
        they are rendered as their text, as `decode(ids)` does.

        Where the stream sits in the text matters only for SentencePiece vocabularies,
        whose `decode` drops the space `encode` put in front of each text fragment:
        - default: the tokens continue a prompt (generation), so a leading '▁' is a real
          space and is kept, as it is in decode(prompt + generated);
        - after_token: the prompt's last token; after a special token a new fragment starts
          and its leading space is dropped, again as decode(prompt + generated) does;
        - at_start=True: the stream is the whole text, concatenation == decode(ids)."""
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self._text_cache: str | None = ""
        # the tokenizer's optional methods, looked up once (push runs for every token)
        self._piece_of = getattr(tokenizer, "piece", None)
        self._after = getattr(tokenizer, "starts_fragment_after", None)
        if after_token is not None and self._after is not None:
            self._fragment_start = bool(self._after(after_token))
        else:
            self._fragment_start = at_start
        self._ids = 0

    def _piece(self, token_id: int) -> bytes:
        piece = self._piece_of
        if piece is not None:  # our backends: same spacing rule as decode()
            skip = self._skip_special
            raw: bytes = piece(token_id, fragment_start=False, skip_special=skip)
            data: bytes = (
                piece(token_id, fragment_start=True, skip_special=skip)
                if self._fragment_start
                else raw
            )
            after = self._after
            at_start = self._fragment_start and not raw  # nothing shown yet
            self._fragment_start = at_start or (bool(after(token_id)) if after else False)
            return data
        return self._tok.token_bytes(token_id)

    def push(self, token_id: int) -> str:
        """Text completed by this token (may be empty while a code point is split)."""
        text = self._utf8.decode(self._piece(token_id), final=False)
        self._ids += 1
        if text:
            self._parts.append(text)
            self._text_cache = None
        return text

    def flush(self) -> str:
        """End of stream: whatever is held back (U+FFFD for an incomplete sequence)."""
        text = self._utf8.decode(b"", final=True)
        if text:
            self._parts.append(text)
            self._text_cache = None
        return text

    @property
    def pending(self) -> bytes:
        """Bytes held back, waiting for the rest of their code point."""
        return self._utf8.getstate()[0]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._parts)
            self._parts = [self._text_cache]
        return self._text_cache

    @property
    def tokens_seen(self) -> int:
        return self._ids

"""Optional API keys: read from a file (one per line; blank lines and ``#`` comments are
skipped), checked against ``Authorization: Bearer <key>`` in constant time.

Every configured key is compared (``hmac.compare_digest`` on equal-length digests), so the
time taken says neither whether nor which key matched. Keys are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        # compare SHA-256 digests: equal lengths, so compare_digest's time does not depend
        # on the presented key's length either
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        keys = []
        for line in path.read_text().splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                keys.append(key)
        if not keys:
            raise ValueError(f"{path}: no API keys in the file")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: bytes | None) -> bool:
        """True when the header carries one of the keys (always True with no keys)."""
        if not self._digests:
            return True
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        presented = hashlib.sha256(token.strip()).digest()
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(presented, digest)
        return ok

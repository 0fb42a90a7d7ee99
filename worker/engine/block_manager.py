"""Paged KV cache bookkeeping: fixed-size blocks, a block table per sequence, a prefix cache.

The backend owns the KV memory (`n_blocks` blocks of `block_size` token positions, every
layer's K and V); this module decides which block holds which positions of which sequence.
It never touches device memory: the only device work it asks for is a block copy
(copy-on-write), which the caller passes on to the backend.

Admission reserves: a sequence is admitted only when the blocks it may ever need (prompt +
every generated token that is fed back) fit beside everything already promised. It then
takes blocks one at a time as it grows, out of its reservation. So a running sequence never
waits for a block and is never preempted (recomputing a preempted sequence would change its
bits: see docs on batch invariance); a sequence that does not fit now waits in the queue,
and one that could never fit is refused before it starts.

Prefix cache: every full block of a *prompt* is published under a content hash that chains
the hashes of all blocks before it (so equal hashes mean equal token prefixes, not just
equal blocks). A new sequence whose prompt starts with published blocks maps them into its
own table instead of computing them (reference counted; published blocks are never written
again). Only prompt blocks are published: their KV was computed by the prefill path, so a
hit gives the same bits the sequence would compute itself. A block whose last user left
stays cached (evictable) and is reused least-recently-used first when free blocks run out.
When the whole prompt is cached, the last prompt position must still run to produce logits;
it is recomputed into a private copy of its block (copy-on-write) so the shared one never
changes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Allocation", "BlockManager", "chain_hashes"]


def chain_hashes(tokens: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Content hash of each full block of `tokens`: H(i) = blake2b(H(i-1) || ids of block i)."""
    out: list[bytes] = []
    h = parent
    for b in range(len(tokens) // block_size):
        ids = tokens[b * block_size : (b + 1) * block_size]
        m = hashlib.blake2b(h, digest_size=16)
        m.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in ids))
        h = m.digest()
        out.append(h)
    return out


@dataclass
class Allocation:
    """One sequence's view of the cache."""

    table: list[int] = field(default_factory=list)  # block ids, position p in table[p // bs]
    reserved: int = 0  # blocks still promised to this sequence
    cached_tokens: int = 0  # leading positions whose KV came from the prefix cache
    published: int = 0  # leading blocks of the prompt already in the prefix cache
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of full prompt blocks
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) to copy first


class BlockManager:
    """See the module docstring. Single-threaded: the engine thread owns it."""

    def __init__(self, n_blocks: int, block_size: int, *, prefix_cache: bool = True) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"need n_blocks >= 1 and block_size >= 1 ({n_blocks}, {block_size})")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._free: list[int] = list(range(n_blocks - 1, -1, -1))  # pop() gives low ids first
        self._ref = [0] * n_blocks
        self._hash_of: dict[int, bytes] = {}  # published block -> its chain hash
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # published, unreferenced; LRU
        self._reserved = 0
        self.hits = 0  # prompt blocks served from the cache (statistics)
        self.lookups = 0

    # ------------------------------------------------------------------ accounting

    @property
    def available(self) -> int:
        """Blocks a new reservation may claim: free + evictable - promised."""
        return len(self._free) + len(self._evictable) - self._reserved

    @property
    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.n_blocks - len(self._free) - len(self._evictable)

    @property
    def cached(self) -> int:
        """Published blocks (in use or evictable)."""
        return len(self._hash_of)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ lifecycle

    def match(self, prompt: Sequence[int]) -> tuple[list[bytes], int]:
        """(chain hashes of the prompt's full blocks, how many leading ones are cached)."""
        hashes = chain_hashes(prompt, self.block_size) if self.prefix_cache else []
        n = 0
        for h in hashes:
            if h not in self._by_hash:
                break
            n += 1
        return hashes, n

    def admit(self, prompt: Sequence[int], kv_tokens: int, align: int = 1) -> Allocation | None:
        """Map the cached prefix of `prompt` and reserve the rest of `kv_tokens` positions;
        None when that does not fit now (nothing is changed then).

        At most the positions before the last prompt token come from the cache (that one
        must run to give logits), rounded down to a multiple of `align` tokens (a backend
        whose results depend on how a prompt is chunked passes its chunk size)."""
        hashes, n_hit = self.match(prompt)
        bs = self.block_size
        cached_tokens = min(n_hit * bs, len(prompt) - 1)
        cached_tokens = (cached_tokens // align) * align
        n_hit = -(-cached_tokens // bs)
        cow = cached_tokens % bs != 0  # the last hit block is only partly reused: copy it
        need = self.blocks_for(kv_tokens) - n_hit + (1 if cow else 0)
        hit_blocks = [self._by_hash[h] for h in hashes[:n_hit]]
        # hits that are evictable now stop being available to others
        reclaimed = sum(1 for b in hit_blocks if self._ref[b] == 0)
        if need > self.available - reclaimed:
            return None
        self.lookups += 1
        for b in hit_blocks:
            if self._ref[b] == 0:
                self._evictable.pop(b, None)
            self._ref[b] += 1
        self.hits += n_hit
        alloc = Allocation(
            table=hit_blocks,
            reserved=need,
            cached_tokens=cached_tokens,
            published=n_hit,
            hashes=hashes,
        )
        self._reserved += need
        if cow:
            # the block holding the first position to compute is shared: write a private copy
            src = alloc.table[-1]
            dst = self._take(alloc)
            alloc.copies.append((src, dst))
            alloc.table[-1] = dst
            alloc.published -= 1
            self._unref(src)
        return alloc

    def grow(self, alloc: Allocation, tokens: int) -> None:
        """Make the table cover positions [0, tokens) (out of the reservation)."""
        while len(alloc.table) * self.block_size < tokens:
            alloc.table.append(self._take(alloc))

    def publish(self, alloc: Allocation, computed_prompt_tokens: int) -> None:
        """Publish the full prompt blocks whose positions are all computed now."""
        if not self.prefix_cache:
            return
        full = min(computed_prompt_tokens // self.block_size, len(alloc.hashes))
        while alloc.published < full:
            i = alloc.published
            b, h = alloc.table[i], alloc.hashes[i]
            if h not in self._by_hash and b not in self._hash_of:
                self._by_hash[h] = b
                self._hash_of[b] = h
            alloc.published += 1

    def release(self, alloc: Allocation) -> None:
        """Give back every block and the unused reservation of a finished sequence."""
        for b in alloc.table:
            self._unref(b)
        alloc.table = []
        self._reserved -= alloc.reserved
        alloc.reserved = 0

    # ------------------------------------------------------------------ internals

    def _take(self, alloc: Allocation) -> int:
        if alloc.reserved <= 0:
            raise RuntimeError("sequence grew past its KV reservation")
        alloc.reserved -= 1
        self._reserved -= 1
        if self._free:
            b = self._free.pop()
        else:  # evict the least recently used cached block
            b, _ = self._evictable.popitem(last=False)
            h = self._hash_of.pop(b)
            del self._by_hash[h]
        self._ref[b] = 1
        return b

    def _unref(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] > 0:
            return
        if b in self._hash_of:
            self._evictable[b] = None  # most recently used at the end
        else:
            self._free.append(b)

    def check(self) -> None:
        """Invariants (tests): every block is exactly one of free / evictable / referenced."""
        free, ev = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate free block"
        assert not free & ev, "block both free and evictable"
        for b in range(self.n_blocks):
            if b in free:
                assert self._ref[b] == 0 and b not in self._hash_of
            elif b in ev:
                assert self._ref[b] == 0 and b in self._hash_of
            else:
                assert self._ref[b] > 0, f"block {b} leaked"
        assert self.available >= 0
        for h, b in self._by_hash.items():
            assert self._hash_of[b] == h

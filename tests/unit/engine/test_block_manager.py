"""BlockManager: reservations, growth, the prefix cache (hash chain, sharing, copy-on-write,
least-recently-used eviction) and its invariants after random workloads."""

from __future__ import annotations

import random

import pytest

from worker.engine.block_manager import BlockManager, chain_hashes

BS = 4


def test_chain_hash_depends_on_the_whole_prefix() -> None:
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = chain_hashes([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS) == a


def test_reservation_is_what_admission_checks() -> None:
    bm = BlockManager(10, BS)
    a = bm.admit(list(range(10)), kv_tokens=17)  # 5 blocks
    assert a is not None and a.reserved == 5 and bm.available == 5
    assert bm.admit(list(range(100, 110)), kv_tokens=24) is None  # 6 > 5: waits
    bm.check()
    b = bm.admit(list(range(100, 110)), kv_tokens=20)
    assert b is not None and bm.available == 0
    bm.grow(a, 10)
    assert len(a.table) == 3 and a.reserved == 2
    bm.grow(a, 17)
    assert len(a.table) == 5 and a.reserved == 0
    with pytest.raises(RuntimeError, match="reservation"):
        bm.grow(a, 21)
    bm.release(a)
    bm.release(b)
    assert bm.available == 10 and bm.used == 0
    bm.check()


def test_prefix_hit_shares_blocks_and_never_covers_the_last_prompt_token() -> None:
    bm = BlockManager(32, BS)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks
    a = bm.admit(prompt, kv_tokens=20)
    assert a is not None and a.cached_tokens == 0
    bm.grow(a, 13)
    bm.publish(a, 13)
    assert bm.cached == 3
    b = bm.admit([*prompt, 99, 98], kv_tokens=20)
    assert b is not None and b.cached_tokens == 12 and b.table == a.table[:3]
    assert not b.copies
    # the same prompt again: 12 positions cached, 13th computed in a fresh block
    c = bm.admit(prompt, kv_tokens=13)
    assert c is not None and c.cached_tokens == 12 and not c.copies
    bm.check()
    for x in (a, b, c):
        bm.release(x)
    assert bm.used == 0 and bm.cached == 3  # evictable, still cached
    bm.check()


def test_copy_on_write_when_the_whole_prompt_is_cached() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(1, 9))  # exactly 2 blocks
    a = bm.admit(prompt, kv_tokens=12)
    assert a is not None
    bm.grow(a, 8)
    bm.publish(a, 8)
    b = bm.admit(prompt, kv_tokens=12)
    assert b is not None and b.cached_tokens == 7
    assert len(b.copies) == 1
    src, dst = b.copies[0]
    assert src == a.table[1] and dst == b.table[1] and dst != src
    assert b.table[0] == a.table[0]  # the first block stays shared
    bm.grow(b, 12)
    bm.check()
    bm.release(a)
    bm.release(b)
    bm.check()


def test_lru_eviction_takes_the_oldest_unreferenced_cached_block() -> None:
    bm = BlockManager(4, BS)
    p1, p2 = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    for p in (p1, p2):
        a = bm.admit(p, kv_tokens=5)
        assert a is not None
        bm.grow(a, 5)
        bm.publish(a, 5)
        bm.release(a)
    assert bm.cached == 2 and bm.available == 4
    # three fresh blocks: the two free ones, then the least recently used cached one (p1's)
    big = bm.admit([50, 51, 52, 53, 54, 55, 56, 57, 58, 59], kv_tokens=12)
    assert big is not None
    bm.grow(big, 12)
    _, hit1 = bm.match(p1)
    _, hit2 = bm.match(p2)
    assert (hit1, hit2) == (0, 1)
    bm.check()


def test_random_workload_keeps_the_invariants() -> None:
    rnd = random.Random(7)
    bm = BlockManager(40, BS)
    live = []
    prefixes = [[rnd.randrange(50) for _ in range(rnd.randrange(1, 20))] for _ in range(5)]
    for _ in range(500):
        if live and rnd.random() < 0.4:
            bm.release(live.pop(rnd.randrange(len(live))))
        else:
            prompt = rnd.choice(prefixes) + [rnd.randrange(50) for _ in range(rnd.randrange(1, 9))]
            kv = len(prompt) + rnd.randrange(0, 10)
            a = bm.admit(prompt, kv, align=rnd.choice([1, 1, 4]))
            if a is None:
                continue
            grow = rnd.randrange(a.cached_tokens + 1, kv + 1)
            bm.grow(a, grow)
            bm.publish(a, min(grow, len(prompt)))
            live.append(a)
        bm.check()
    for a in live:
        bm.release(a)
    bm.check()
    assert bm.used == 0 and bm.available == 40

"""The reference sampler: logits of one position -> one token id.

Every backend must pick the same id as `sample()` for the same float32 logits, `params`,
`draw` and `generated`. To make that possible on a GPU, the pipeline is specified exactly:
the only floating-point operations are single IEEE float32 additions, multiplications and
divisions (correctly rounded on every device; on CUDA use the `__f*_rn` intrinsics so no
FMA contraction happens), and every sum, threshold and comparison after the exponential
is done on integers, so the order of a reduction can never change the result.

Pipeline (SamplingParams documents the same order):

1. Repetition penalty `p` (1 = off) over the *distinct* ids in `generated`:
   `l = l / f32(p)` where `l > 0`, else `l = l * f32(p)`. (0 < p < 1 boosts repeats; p = 0
   makes every positive repeated logit +inf, i.e. forces a repeat.)
2. Temperature `T`: `T == 0` -> greedy: the argmax of the penalized logits, lowest index on
   ties (nothing below applies). Otherwise `z = l / f32(T)` (float32).
3. `x = (z - max(z)) + 0.0` in float32 (`+0.0` turns -0.0 into +0.0; where `z == max(z)`,
   `x = 0`, which also covers an infinite max). The candidate order used by every later
   step is: `x` descending, ties by lower token id.
4. Top-k (`k = 0` off): keep the first `k` candidates in that order.
5. Softmax weights as integers (the "float64 or float32" choice: neither; see below):
   `w = floor(exp32(x) * 2**40)` for `x >= -28`, else `w = 0`, where `exp32` is the
   fixed float32 routine `_exp32` below (Cody-Waite reduction by ln 2 and a degree-7
   Horner polynomial, every step one rounded float32 operation, then an exact `ldexp`).
   The max token has `w = 2**40` exactly; a token 28 nats below the max or further has
   weight 0 and can never be drawn. The mass this drops is below `vocab * 2**-40` of the
   total (< 2e-7 for 201088 tokens). Tokens with `w = 0` are discarded. `Z = sum(w)`
   (exact in int64: at most 2**18 tokens * 2**40).
6. Top-p (`top_p >= 1` off): keep the shortest prefix, in candidate order, whose
   cumulative weight is `>= top_p * Z` (compared exactly, as rationals); at least one.
7. Min-p (`min_p <= 0` off): keep tokens with `w >= min_p * w_max` (exactly; `w_max` is
   the first candidate's weight). Applied to the same weights as top-p, so 6 and 7 are
   plain set filters and commute.
8. Draw: `S = sum of kept w`; walk the kept tokens in candidate order and return the first
   whose inclusive cumulative weight is `> draw * S` (exact rational comparison; `draw` is
   a float64 in [0, 1), from worker.engine.rng.uniform).

Why integers: a float softmax would make the chosen id depend on how a device associates
its sums and on its `exp`'s last bit; with `_exp32` built from rounded float32 steps and
exact integer sums, a GPU implementation can reproduce every id bit for bit.

Speed: no full sort and no gather of the vocabulary. Arrays stay full-length (position =
token id); a filter multiplies weights by a mask. Order-dependent steps (top-k, top-p, the
draw) are selections: one count / sum above a float32 threshold of `x` settles the usual,
peaked case; otherwise a 1/256-nat histogram of `x` with per-bin weight bounds narrows the
crossing to a few bins; only those tokens are ordered (a weighted quickselect if there are
many, e.g. thousands of exactly tied logits). On real Qwen logits (151936 tokens) a call
takes 0.03 ms greedy and about 0.6-1.8 ms sampled on the 2-core CI box (BENCHMARKS.md);
half of that is `exp32`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from worker.engine.params import SamplingParams
from worker.errors import ErrorCode, WorkerError

__all__ = ["WEIGHT_BITS", "X_CUTOFF", "exp32", "sample", "sampling_weights"]

WEIGHT_BITS = 40
X_CUTOFF = np.float32(-28.0)

_F32 = np.float32
_LOG2E = _F32(1.44269504088896341)
# ln 2 split so that n * _LN2_HI is exact for |n| < 2**15 (9 significant bits).
_LN2_HI = _F32(0.693359375)
_LN2_LO = _F32(-2.12194440e-4)
# Taylor coefficients of exp(r), |r| <= 0.35: degree 7 keeps the error near 1e-8.
_COEFFS = tuple(_F32(c) for c in (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0))
_TOP_EDGES = tuple(_F32(v) for v in (-4.0, -2.0, -1.0))
_BINS_PER_NAT = 256
_N_BINS = int(-X_CUTOFF) * _BINS_PER_NAT + 1  # bins 0..7168 cover x in [-28, 0]
_EDGES = np.exp(-np.arange(_N_BINS + 1) / _BINS_PER_NAT) * float(1 << WEIGHT_BITS)
_W_HI = _EDGES[:-1] * (1 + 1e-6) + 1  # per-bin upper bound of a weight (float64)
_W_LO = np.maximum(_EDGES[1:] * (1 - 1e-6) - 1, 0.0)  # lower bound of a nonzero weight
_BLOCK = 32768  # elements per cache-sized block in sampling_weights
_SMALL = 4096  # at most this many candidates: order them with one sort


def exp32(x: np.ndarray) -> np.ndarray:
    """exp(x) * 2**WEIGHT_BITS for float32 x in [-28, 0], as float32 (not yet floored).

    Each statement is one correctly rounded float32 operation (or an exact one), in this
    order: n = rint(x * log2e); r = (x - n * LN2_HI) - n * LN2_LO; Horner over _COEFFS
    (p = c0; p = p * r + c for the rest, as two roundings); then p * 2**(n + 40) exactly.
    """
    x = np.asarray(x, dtype=_F32)
    n = np.multiply(x, _LOG2E)
    np.rint(n, out=n)
    t = np.multiply(n, _LN2_HI)
    r = np.subtract(x, t)
    np.multiply(n, _LN2_LO, out=t)
    r -= t
    p = np.multiply(r, _COEFFS[0])
    p += _COEFFS[1]
    for c in _COEFFS[2:]:
        p *= r
        p += c
    # 2**(n + 40) built from its float32 bits (n >= -41, so always a normal number).
    scale = n.astype(np.int32)
    scale += 127 + WEIGHT_BITS
    scale <<= 23
    p *= scale.view(_F32)
    return p


def sampling_weights(x: np.ndarray) -> np.ndarray:
    """Integer weights (step 5) of float32 offsets x = z - max(z) <= 0:
    floor(exp32(x)) for x >= -28, else 0.

    The same float32 operations as `exp32`, in the same order, but run block by block
    (32768 elements) in preallocated buffers: the working set stays in cache, which makes
    this about four times faster than whole-vector passes on a 151936-token vocabulary."""
    x = np.asarray(x, dtype=_F32)
    out = np.empty(x.size, dtype=np.int64)
    blk = min(_BLOCK, x.size)
    xc, n, t, r, p = (np.empty(blk, dtype=_F32) for _ in range(5))
    sc = np.empty(blk, dtype=np.int32)
    for s in range(0, x.size, blk):
        m = min(blk, x.size - s)
        xb = x[s : s + m]
        xcb, nb, tb, rb, pb, scb = xc[:m], n[:m], t[:m], r[:m], p[:m], sc[:m]
        np.maximum(xb, X_CUTOFF, out=xcb)
        np.multiply(xcb, _LOG2E, out=nb)
        np.rint(nb, out=nb)
        np.multiply(nb, _LN2_HI, out=tb)
        np.subtract(xcb, tb, out=rb)
        np.multiply(nb, _LN2_LO, out=tb)
        rb -= tb
        np.multiply(rb, _COEFFS[0], out=pb)
        pb += _COEFFS[1]
        for c in _COEFFS[2:]:
            pb *= rb
            pb += c
        scb[...] = nb
        scb += 127 + WEIGHT_BITS
        scb <<= 23
        pb *= scb.view(_F32)
        ob = out[s : s + m]
        ob[...] = pb  # float32 -> int64 truncates, i.e. floors these positive values
        ob *= xb >= X_CUTOFF
    return out


def _ceil_mul(f: float, n: int) -> int:
    """ceil(f * n) exactly, for a float f and an int n."""
    fr = Fraction(f) * n
    return -((-fr.numerator) // fr.denominator)


def _floor_mul(f: float, n: int) -> int:
    fr = Fraction(f) * n
    return fr.numerator // fr.denominator


def _keys(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is the candidate order (x desc, id asc)."""
    bits = x.view(np.int32).astype(np.int64)
    s = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in x as a signed integer
    return ((np.int64(0x7FFFFFFF) - s).astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64)


def _crossing_sorted(weights: np.ndarray, target: int) -> int:
    """Position of the first element whose inclusive cumulative weight exceeds target."""
    cum = np.cumsum(weights)
    pos = int(np.searchsorted(cum, target, side="right"))
    if pos >= len(cum):
        raise AssertionError("sampling target beyond the total weight")
    return pos


def _quickselect(keys: np.ndarray, w: np.ndarray, target: int) -> int:
    """Key of the first element (ascending key order) whose cumulative weight > target.
    Keys are distinct; deterministic pivots (median of a strided sample)."""
    acc = 0
    while keys.size > _SMALL:
        step = max(1, keys.size // 31)
        sample = np.sort(keys[::step])
        pivot = sample[len(sample) // 2]
        lo = keys < pivot
        m = int(w[lo].sum())
        if acc + m > target:
            keys, w = keys[lo], w[lo]
        else:
            acc += m
            hi = ~lo
            keys, w = keys[hi], w[hi]
    order = np.argsort(keys)
    pos = _crossing_sorted(w[order], target - acc)
    return int(keys[order[pos]])


def _finish(ids: np.ndarray, x: np.ndarray, w: np.ndarray, target: int) -> tuple[float, int]:
    """Exact crossing inside a subset (ids, their x and weights) known to hold it, with
    `target` counted from the subset's start."""
    if ids.size <= _SMALL:
        order = np.lexsort((ids, -x))
        pos = order[_crossing_sorted(w[order], target)]
        return float(x[pos]), int(ids[pos])
    key = _quickselect(_keys(x, ids), w, target)
    tok = key & 0xFFFFFFFF
    return float(x[np.flatnonzero(ids == tok)[0]]), tok


class _Bins:
    """bin = floor(-x * 256) per token (capped at _N_BINS), computed once per sample() call
    (block by block, like the weights) and only if a selection needs the histogram.

    `filtered` is set once top-p or min-p has zeroed weights of tokens that could otherwise
    carry weight: those must then be moved out of the histogram. Tokens whose weight is 0
    only because they lie below the cutoff need no such care: their bins' lower weight
    bound is already 0."""

    __slots__ = ("_b", "filtered", "x")

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.filtered = False
        self._b: np.ndarray | None = None

    def get(self, w: np.ndarray | None) -> np.ndarray:
        if self._b is None:
            x = self.x
            self._b = np.empty(x.size, dtype=np.intp)
            blk = min(_BLOCK, x.size)
            buf = np.empty(blk, dtype=_F32)
            for s in range(0, x.size, blk):
                m = min(blk, x.size - s)
                bb = buf[:m]
                np.multiply(x[s : s + m], _F32(-_BINS_PER_NAT), out=bb)  # exact (power of 2)
                np.floor(bb, out=bb)
                np.minimum(bb, _F32(_N_BINS), out=bb)  # also maps -inf (+inf once scaled)
                self._b[s : s + m] = bb
        if w is not None and self.filtered:
            return np.where(w > 0, self._b, _N_BINS)
        return self._b


def _select(
    x: np.ndarray, w: np.ndarray | None, target: int, bins: _Bins | None = None
) -> tuple[float, int]:
    """The (x, id) of the first token, in candidate order, whose inclusive cumulative weight
    exceeds target; w=None counts the candidates (x >= -28) instead. Positions in x stand
    for token ids (same order; returned as the id); filtered-out tokens have weight 0,
    which can never be chosen.

    First a few cheap threshold sums near the top (the usual, peaked case); failing that, a
    histogram of x in bins of 1/256 nat (bin = floor(-x * 256), monotone in x, so bins are
    contiguous runs of the candidate order) locates the bins that can hold the crossing,
    and only those tokens are ordered."""
    for edge in _TOP_EDGES:  # widest first: one pass settles the usual case
        idx = np.flatnonzero(x >= edge)
        if idx.size > _SMALL:
            continue
        ws = np.ones(idx.size, dtype=np.int64) if w is None else w[idx]
        if int(ws.sum()) > target:
            return _finish(idx, x[idx], ws, target)
        break  # a narrower edge holds even less
    out = _N_BINS  # the bin of tokens that cannot be chosen: x < -28, or weight 0
    b = (bins or _Bins(x)).get(w)
    counts = np.bincount(b, minlength=out + 1)[:out]
    cum_counts = np.cumsum(counts)
    if w is None:
        k_lo = k_hi = int(np.searchsorted(cum_counts, target, side="right"))
    else:
        # Weighted per-bin sums are slow in NumPy; bound them instead. Every nonzero weight
        # in bin j lies in [W(j+1) - 1, W(j)], W(j) = exp(-j / 256) * 2**40 (widened by 1e-6
        # for the polynomial's error), so the crossing bin lies between the first bin whose
        # upper cumulative bound exceeds target and the first whose lower bound does.
        upper = np.cumsum(counts * _W_HI)
        lower = np.cumsum(counts * _W_LO)
        k_lo = int(np.searchsorted(upper, target, side="right"))
        k_hi = min(int(np.searchsorted(lower, target, side="right")), out - 1)
    # Tokens in bins <= k_hi: those before the band (their total is `before`) and the band.
    upto = np.flatnonzero(b <= k_hi)
    bu = b[upto]
    in_band = bu >= k_lo
    idx = upto[in_band]
    if w is None:
        before = int(upto.size - idx.size)
        ws = np.ones(idx.size, dtype=np.int64)
    else:
        wu = w[upto]
        ws = wu[in_band]
        before = int(wu.sum()) - int(ws.sum())
    if not 0 <= target - before < int(ws.sum()):  # cannot happen while the bounds hold
        idx = np.flatnonzero(x >= X_CUTOFF) if w is None else np.flatnonzero(w)
        ws = np.ones(idx.size, dtype=np.int64) if w is None else w[idx]
        return _finish(idx, x[idx], ws, target)
    return _finish(idx, x[idx], ws, target - before)


def _through(x: np.ndarray, x_k: float, id_k: int) -> np.ndarray:
    """Mask of the tokens up to and including (x_k, id_k) in candidate order (ids are
    positions in x, whose order is the token-id order)."""
    xk = _F32(x_k)
    keep = x > xk
    ties = np.flatnonzero(x == xk)
    keep[ties[ties <= id_k]] = True
    return keep


def _penalize(logits: np.ndarray, penalty: float, generated: Sequence[int]) -> np.ndarray:
    ids = np.unique(np.asarray(generated, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.size)]
    if ids.size == 0:
        return logits
    out = logits.copy()
    vals = out[ids]
    p = _F32(penalty)
    with np.errstate(divide="ignore"):
        out[ids] = np.where(vals > 0, vals / p, vals * p)
    return out


def _check(params: SamplingParams, draw: float) -> None:
    if not (params.temperature >= 0.0 and np.isfinite(params.temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not params.repetition_penalty >= 0.0:
        raise ValueError(f"repetition_penalty must be >= 0, got {params.repetition_penalty}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
    if not 0.0 <= params.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {params.top_p}")
    if not 0.0 <= params.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {params.min_p}")
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), got {draw}")


def sample(
    logits: np.ndarray, params: SamplingParams, draw: float, generated: Sequence[int]
) -> int:
    """Pick the next token id from one position's logits (see the module docstring)."""
    _check(params, draw)
    l = np.asarray(logits, dtype=_F32)
    if l.ndim != 1 or l.size == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {l.shape}")
    if np.isnan(l).any():
        raise WorkerError(ErrorCode.INTERNAL, "NaN in logits")
    if params.repetition_penalty != 1.0 and len(generated):
        l = _penalize(l, params.repetition_penalty, generated)
    if params.greedy:
        return int(np.argmax(l))

    with np.errstate(over="ignore"):
        x = np.divide(l, _F32(params.temperature))
    zmax = x.max()
    if np.isfinite(zmax):
        x -= zmax
        x += _F32(0.0)
    else:  # +inf (forced by penalty 0 or tiny T) or every logit -inf
        x = np.where(x == zmax, _F32(0.0), _F32(-np.inf)).astype(_F32)

    # Arrays stay full-length (position = token id): filters zero weights, never gather.
    # After top-k only the k survivors remain, in id order (position order = id order).
    ids: np.ndarray | None = None
    bins = _Bins(x)
    if params.top_k > 0 and params.top_k < int(np.count_nonzero(x >= X_CUTOFF)):
        x_k, pos_k = _select(x, None, params.top_k - 1, bins)
        ids = np.flatnonzero(_through(x, x_k, pos_k))
        x = x[ids]
        bins = _Bins(x)
    w = sampling_weights(x)  # 0 below the cutoff
    if params.top_p < 1.0:
        need = max(1, _ceil_mul(params.top_p, int(w.sum())))
        x_p, pos_p = _select(x, w, need - 1, bins)
        w *= _through(x, x_p, pos_p)
        bins.filtered = True
    if params.min_p > 0.0:
        # the first candidate has x = 0 and exp32(0) = 1 exactly: w_max = 2**40
        w *= w >= _ceil_mul(params.min_p, 1 << WEIGHT_BITS)
        bins.filtered = True
    _, pos = _select(x, w, _floor_mul(draw, int(w.sum())), bins)
    return pos if ids is None else int(ids[pos])

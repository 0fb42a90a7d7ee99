"""Launch wrappers for the quantized matrix kernels (gemv, gemm, embedding, MoE).

How to call (everything on the thread that owns the CUDA context, context current):

    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.matmul import MatmulKernels
    from worker.backends.cuda.plans.base import QWeight
    mm = MatmulKernels("sm_90")          # loads cuda_src/{gemv,gemm,embed,moe}.cu (hash cache)
    w = QWeight(ptr=arena_ptr + off, qtype=12, rows=N, cols=K, nbytes=tensor_nbytes)
    mm.linear(w, x=DevBuf(x_ptr, x_nbytes), y=DevBuf(y_ptr, y_nbytes), ntok=M,
              bias=DevBuf(b_ptr, b_nbytes) or None, residual=None, stream=stream)

- Pointers: a `DevBuf(ptr, nbytes)`, a `(ptr, nbytes)` tuple whose ptr is an int or a
  `pycuda.driver.DeviceAllocation`, or a pycuda `GPUArray` (its gpudata and nbytes). The
  nbytes is what the wrapper checks every access against; for a view into an arena give the
  bytes from ptr to the end of the view.
- Weights: `QWeight` = ggml type id (`gguf.GGMLQuantizationType` value), rows N, columns K
  (ggml ne1, ne0), 256-byte-aligned pointer, nbytes >= N * row_bytes; experts > 1 for a 3-D
  expert tensor [experts][N][K] (MoE).
- Activations are float32, row-major: x[t] at x + t*ldx (elements), y[t] at y + t*ldy.
  ldx defaults to K and ldy to N. x must be 16-byte aligned with ldx % 4 == 0.
- `linear` computes y[t] = W x[t] (+ bias) (+ residual[t]) for t < ntok: the tensor-core
  arithmetic for every ntok when `MatmulKernels.invariant` (the backend's default: a row's
  result must not depend on ntok), as skinny (one launch) up to SKINNY_MAX_ROWS rows and as
  the gemm above; otherwise ntok <= 8 runs the decode gemv (weights read once for all ntok).
  `residual` has y's layout and may be y itself (in-place residual add); y must not overlap x.
- `stream`: a `pycuda.driver.Stream` or None (the null stream). Launches are asynchronous and
  only enqueue work, so the backend can capture them: begin capture with cuda.bindings on
  `stream.handle`, call the wrappers, end capture. The argument checks run in Python before
  anything is queued; a bad argument raises `LaunchRefused` (arena.py, the same refusal as
  kernels.py's launches: a `CudaError`, code CUDA_ERROR) naming the kernel; a failed launch
  raises `CudaError` naming the kernel. Errors of the running kernel surface at the caller's
  next synchronize.
- The `plan_*` functions of the `plans` package (`base`: the types and checks; `dense`: gemv,
  gemm, skinny, embedding; `moe`: the routed forms; `i15`: the integer products) do the
  checks and return the `Launch` (kernel name, grid, block, args) without a GPU;
  `MatmulKernels.run(launch, stream)` queues one.
"""

from __future__ import annotations

from typing import Any

from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.backends.cuda.plans.base import (
    BufLike,
    Launch,
    QWeight,
    as_buf,
    require,
)
from worker.backends.cuda.plans.dense import (
    GEMV_MAX_TOKENS,
    SKINNY_MAX_ROWS,
    gemm_split,
    gemm_version,
    plan_embed,
    plan_gemm,
    plan_gemm_x16,
    plan_gemv,
    plan_skinny,
    plan_splitk_reduce,
)
from worker.backends.cuda.plans.i15 import (
    I15_DENSE_MIN_WEIGHTS,
    I15_KQUANTS,
    I15_MOE_TYPES,
    I15_TYPES,
    INT15_DENSE,
    INT15_EXPERTS,
    INT15_LARGE,
    i15_block,
    i15_fold,
    i15_planes,
    i15_split,
    i15_tiles,
    moe15_tile,
    plan_i15,
    plan_moe15_combine,
    plan_moe15_glu,
    plan_moe_i15,
    plan_quant_x15,
)
from worker.backends.cuda.plans.moe import (
    MOE_SKINNY_MAX_TOKENS,
    MOE_SKINNY_TILE_M,
    MoeRoute,
    moe5_tile_m,
    moe_split,
    moe_workspace_bytes,
    plan_moe,
    plan_moe_route,
    same_shape,
)
from worker.errors import CudaError

MODULES = ("gemv", "gemm", "embed", "moe", "i15")  # cuda_src/<name>.cu, loaded by MatmulKernels


def prefer_shared(fn: Any) -> None:
    """Ask for the largest shared-memory carveout for this function: the gemv pipeline and the
    gemm tiles live in shared memory, and the context prefers L1 (docs/design.md), which would cut
    the blocks resident per SM."""
    import pycuda.driver as drv

    carve = getattr(drv.function_attribute, "PREFERRED_SHARED_MEMORY_CARVEOUT", None)
    try:
        if carve is not None:
            fn.set_attribute(carve, 100)
        else:
            fn.set_cache_config(drv.func_cache.PREFER_SHARED)
    except (AttributeError, drv.Error):  # older pycuda or driver: the cache-config hint
        fn.set_cache_config(drv.func_cache.PREFER_SHARED)


def allow_dynamic_shared(fn: Any, kernel: str, nbytes: int) -> None:
    """Raise fn's dynamic shared-memory limit to nbytes (needed above 48 KB)."""
    import pycuda.driver as drv

    try:
        fn.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
    except (AttributeError, drv.Error) as e:
        raise CudaError(f"{kernel}: cannot allow {nbytes} bytes of shared memory: {e}") from e


class MatmulKernels:
    """Loaded modules and prepared functions; create and use on the CUDA context thread."""

    def __init__(self, arch: str | None = None) -> None:
        from worker.backends.cuda.compile import load_module

        if arch is None:
            import pycuda.driver as drv

            major, minor = drv.Context.get_device().compute_capability()
            arch = f"sm_{major}{minor}"
        self.arch = arch
        self._modules = {name: load_module(name, arch) for name in MODULES}
        self._funcs: dict[str, Any] = {}
        self._x16: DevBuf | None = None  # gemm3's fp16 X workspace (_x16_workspace)
        self._splitk: DevBuf | None = None  # split-K partials (_splitk_workspace)
        self._x16_keep: list[Any] = []
        self._resident: dict[str, int] = {}
        self._smem_allowed: dict[str, int] = {}  # dynamic shared memory allowed per kernel
        self._moe_ws: DevBuf | None = None  # moe_route's workspace (MatmulKernels.moe)
        self._route_gen = 0  # MoeRoute.gen of the latest routing pre-pass
        self._moe_ws_keep: list[Any] = []
        self._i15_ws: DevBuf | None = None  # quant_x15's planes (_i15_workspace)
        self._i15_tk: DevBuf | None = None  # the integer cores' tickets (_i15_tickets)
        # dense products / routed experts by the 15-bit integer cores (with `invariant`)
        self.int15 = INT15_DENSE
        self.int15_large = INT15_LARGE  # (the K-quant products of I15_DENSE_MIN_WEIGHTS)
        self.int15_experts = INT15_EXPERTS
        # batch invariance: every row count takes the tensor-core forms (gemm, routed
        # moe_gemm), whose per-row arithmetic does not depend on the other rows, so a row's
        # result is the same in a launch of 1 row or of 256; False lets 1-8 rows take the
        # decode gemv (fewer bytes per launch at batch 1, other rounding)
        self.invariant = False
        import pycuda.driver as drv

        dev = drv.Context.get_device()
        attr = drv.device_attribute
        self._sms = int(dev.get_attribute(attr.MULTIPROCESSOR_COUNT))
        self._sm_regs = int(dev.get_attribute(attr.MAX_REGISTERS_PER_MULTIPROCESSOR))
        self._sm_smem = int(dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR))
        self._sm_threads = int(dev.get_attribute(attr.MAX_THREADS_PER_MULTIPROCESSOR))

    def _func(self, launch: Launch) -> Any:
        fn = self._funcs.get(launch.kernel)
        if fn is None:
            try:
                fn = self._modules[launch.module].get_function(launch.kernel)
            except Exception as e:  # pycuda.driver.LogicError: named function not found
                raise CudaError(f"{launch.kernel}: not in module {launch.module}: {e}") from e
            fn.prepare(launch.arg_format)
            prefer_shared(fn)
            self._funcs[launch.kernel] = fn
            self._resident[launch.kernel] = self._sms * self._blocks_per_sm(fn, launch.block[0])
        return fn

    def _blocks_per_sm(self, fn: Any, threads: int) -> int:
        """Blocks of fn resident on one SM (registers, shared memory, threads)."""
        warps = -(-threads // 32)
        regs_per_warp = -(-max(1, int(fn.num_regs)) * 32 // 256) * 256
        by_regs = (self._sm_regs // regs_per_warp) // warps
        by_smem = self._sm_smem // (int(fn.shared_size_bytes) + 1024)
        by_threads = self._sm_threads // threads
        return max(1, min(by_regs, by_smem, by_threads, 32))

    def run(self, launch: Launch, stream: Any = None) -> None:
        """Queue a checked launch on `stream` (pycuda Stream or None)."""
        fn = self._func(launch)
        if launch.shared > self._smem_allowed.get(launch.kernel, 48 * 1024):
            # (skinny's need varies by launch: raised to the largest asked so far)
            allow_dynamic_shared(fn, launch.kernel, launch.shared)
            self._smem_allowed[launch.kernel] = launch.shared
        grid = launch.grid
        if launch.cap_resident:
            grid = (min(grid[0], self._resident[launch.kernel]), grid[1], grid[2])
        try:
            fn.prepared_async_call(
                grid, launch.block, stream, *launch.args, shared_size=launch.shared
            )
        except Exception as e:  # pycuda.driver.Error and subclasses
            raise CudaError(f"{launch.kernel}: launch failed: {e}") from e

    # Convenience: check and queue in one call.
    def gemv(
        self, w: QWeight, x: BufLike, y: BufLike, ntok: int = 1, *, stream: Any = None, **kw: Any
    ) -> None:
        self.run(plan_gemv(w, x, y, ntok, **kw), stream)

    def gemm(
        self, w: QWeight, x: BufLike, y: BufLike, m: int, *, stream: Any = None, **kw: Any
    ) -> None:
        """Tensor-core product (plan_gemm). Version 3 first converts x to fp16 into this
        object's workspace (grown on demand; launches on one stream are ordered, so
        consecutive calls may share it — calls on two streams at once must not use version
        3). K is split as gemm_split decides for the shape (partials in a workspace of this
        object, then plan_splitk_reduce)."""
        version = kw.get("version")
        v = gemm_version(w) if version is None else version
        split = gemm_split(w, self._sms) if "split" not in kw else kw.pop("split")
        launches: list[Launch] = []
        main_kw = dict(kw)
        if split is not None and split[0] > 1:
            part = self._splitk_workspace(split[0] * m * w.rows * 4)
            for key in ("bias", "residual", "ldy"):
                main_kw.pop(key, None)
            reduce = plan_splitk_reduce(
                part,
                split[0],
                m,
                w.rows,
                y,
                bias=kw.get("bias"),
                residual=kw.get("residual"),
                ldy=kw.get("ldy"),
            )
            out: BufLike = part
        else:
            reduce, out = None, y
        if v == 3 and "xh" not in kw:
            ws = self._x16_workspace(m * w.cols * 2)
            launches.append(plan_gemm_x16(x, ws, m, w.cols, ldx=kw.get("ldx")))
            main_kw["xh"] = ws
        launches.append(plan_gemm(w, x, out, m, split=split, **main_kw))
        if reduce is not None:
            launches.append(reduce)
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _splitk_workspace(self, nbytes: int) -> DevBuf:
        """Split-K partials: grown on demand, never freed while this object lives (queued
        launches may still use an older one); reserve() sizes it before any capture."""
        if self._splitk is None or self._splitk.nbytes < nbytes:
            import pycuda.driver as drv

            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()
            alloc = drv.mem_alloc(size)
            self._x16_keep.append(alloc)
            self._splitk = DevBuf(int(alloc), size)
        return self._splitk

    def _x16_workspace(self, nbytes: int) -> DevBuf:
        """A device buffer of at least nbytes for gemm3's fp16 X (kept for the object's life;
        a larger request allocates a larger one and keeps the old, which queued launches may
        still read)."""
        if self._x16 is None or self._x16.nbytes < nbytes:
            import pycuda.driver as drv

            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()
            alloc = drv.mem_alloc(size)
            self._x16_keep.append(alloc)
            self._x16 = DevBuf(int(alloc), size)
        return self._x16

    def takes_i15(self, w: QWeight) -> bool:
        """Whether linear() sends w through the 15-bit integer cores (a choice per weight,
        never per row count: a product's bits must not depend on its batch)."""
        large = w.qtype in I15_KQUANTS and w.rows * w.cols >= I15_DENSE_MIN_WEIGHTS
        return (
            (self.int15 or (self.int15_large and large))
            and self.invariant
            and w.qtype in I15_TYPES
            and w.experts == 1
            and w.cols % i15_block(w.qtype) == 0
        )

    def i15_input_block(self, weights: list[QWeight]) -> int | None:
        """The scale block (32 or 256) of the 15-bit codes that every product of one input
        would take, so its producer may write them (kernels.rmsnorm / swiglu with planes)
        and the products skip their pre-pass; None where one takes another path or they
        differ."""
        blocks = {i15_block(w.qtype) if self.takes_i15(w) else 0 for w in weights}
        return blocks.pop() if len(blocks) == 1 and 0 not in blocks else None

    def linear(
        self,
        w: QWeight,
        x: BufLike,
        y: BufLike,
        ntok: int,
        *,
        stream: Any = None,
        planes: BufLike | None = None,
        **kw: Any,
    ) -> None:
        """gemv for ntok <= 8 (decode, weights read once), tensor-core gemm above; always
        the gemm's arithmetic when `invariant`. The gemm's arithmetic for at most
        SKINNY_MAX_ROWS rows runs as skinny (same bits, one launch). `planes`: x's 15-bit
        codes at w's scale block, already written by x's producer (i15_input_block), used
        when w takes the integer cores."""
        if self.takes_i15(w) and not kw.keys() & {"version", "tile_m", "split", "xh"}:
            self.i15(w, x, y, ntok, stream=stream, planes=planes, **kw)
        elif ntok <= GEMV_MAX_TOKENS and not self.invariant:
            self.gemv(w, x, y, ntok, stream=stream, **kw)
        elif (
            ntok <= SKINNY_MAX_ROWS
            and w.experts == 1
            and not kw.keys() & {"version", "tile_m", "split", "xh"}  # a gemm asked for
        ):
            self.skinny(w, x, y, ntok, stream=stream, **kw)
        else:
            self.gemm(w, x, y, ntok, stream=stream, **kw)

    def i15(
        self,
        w: QWeight,
        x: BufLike,
        y: BufLike,
        m: int,
        *,
        stream: Any = None,
        bias: BufLike | None = None,
        residual: BufLike | None = None,
        ldx: int | None = None,
        ldy: int | None = None,
        planes: BufLike | None = None,
    ) -> None:
        """y = w x (+ bias) (+ residual) by the 15-bit integer cores: quant_x15 (unless
        `planes` holds x's codes already), then gemm15p8 or gemm15p, which also sum their
        splits in order and add bias and residual (one launch)."""
        splits = i15_split(w, self._sms)
        fold = i15_fold(w, m, splits, self._sms)
        blk = i15_block(w.qtype)
        part = self._splitk_workspace((1 if fold else splits) * m * w.rows * 4)
        launches = []
        if planes is None:
            planes = self._i15_workspace(i15_planes(m, w.cols, blk)[4])
            launches.append(plan_quant_x15(x, planes, m, w.cols, ldx=ldx, blk=blk))
        tickets = None if fold else self._i15_tickets(i15_tiles(w, m))
        launches.append(
            plan_i15(
                w,
                planes,
                part,
                m,
                splits,
                y=y,
                bias=bias,
                residual=residual,
                ldy=ldy,
                tickets=tickets,
                fold=fold,
            )
        )
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _i15_tickets(self, n: int) -> DevBuf:
        """The integer cores' tickets (a zero int32 per output tile; each launch leaves them
        zero): grown on demand, zeroed when allocated; reserve() sizes it before any capture."""
        if self._i15_tk is None or self._i15_tk.nbytes < 4 * n:
            import pycuda.driver as drv

            size = 1 << (max(4 * n, 1 << 16) - 1).bit_length()
            alloc = drv.mem_alloc(size)
            drv.memset_d32(alloc, 0, size // 4)
            self._x16_keep.append(alloc)
            self._i15_tk = DevBuf(int(alloc), size)
        return self._i15_tk

    def _i15_workspace(self, nbytes: int) -> DevBuf:
        """quant_x15's planes: grown on demand and kept (queued launches may still read an
        older one); reserve() sizes it before any capture."""
        if self._i15_ws is None or self._i15_ws.nbytes < nbytes:
            import pycuda.driver as drv

            size = 1 << (max(nbytes, 1 << 20) - 1).bit_length()
            alloc = drv.mem_alloc(size)
            self._x16_keep.append(alloc)
            self._i15_ws = DevBuf(int(alloc), size)
        return self._i15_ws

    def skinny(
        self, w: QWeight, x: BufLike, y: BufLike, m: int, *, stream: Any = None, **kw: Any
    ) -> None:
        """plan_skinny with the gemm's split for this shape on this GPU."""
        self.run(plan_skinny(w, x, y, m, split=gemm_split(w, self._sms), **kw), stream)

    def embed(
        self,
        w: QWeight,
        ids: BufLike,
        n: int,
        out: BufLike,
        *,
        stream: Any = None,
        ldo: int | None = None,
    ) -> None:
        self.run(plan_embed(w, ids, n, out, ldo=ldo), stream)

    def arithmetic(self, weights: list[QWeight]) -> dict[str, Any]:
        """Which arithmetic these matrices take (for the load log and bench's record): the
        WORKER_ORCD_INT15 setting, batch invariance, how many dense matrices take the 15-bit
        integer cores and how many the fp16 ones (with invariance off: the decode gemv at
        few rows), and which the experts take ("integer", "fp16", "mixed"; "none")."""
        dense = [w for w in weights if w.experts == 1]
        on = {self.moe_takes_i15(w.qtype) for w in weights if w.experts > 1}
        experts = "none"
        if on:
            experts = "mixed" if len(on) > 1 else "integer" if True in on else "fp16"
        setting = "all" if self.int15 else "auto" if self.int15_large else "experts"
        return {
            "int15": setting if self.int15 or self.int15_large or self.int15_experts else "0",
            "batch_invariant": self.invariant,
            "dense_integer": sum(self.takes_i15(w) for w in dense),
            "dense_fp16": sum(not self.takes_i15(w) for w in dense),
            "experts": experts,
        }

    def moe_takes_i15(self, qtype: int | None) -> bool:
        """Whether experts of this format take the routed integer cores: every step with
        batch invariance on, every step the decode gemv does not take with it off (they are
        faster than the fp16 routed forms at every token count)."""
        return self.int15_experts and qtype in I15_MOE_TYPES

    def moe_form(self, ntok: int, form: str = "auto", qtype: int | None = None) -> str:
        """The form of the expert products of a step of ntok tokens: the decode gemv (not
        invariant, ntok <= 2), else the routed integer cores ("i15") for experts of qtype
        when they take them, else skinny (ntok <= MOE_SKINNY_MAX_TOKENS) or the routed gemm."""
        if form != "auto":
            return form
        if ntok <= 2 and not self.invariant:
            return "gemv"
        if self.moe_takes_i15(qtype):
            return "i15"
        return "skinny" if ntok <= MOE_SKINNY_MAX_TOKENS else "gemm"

    def moe_route(
        self,
        ids: BufLike,
        ntok: int,
        topk: int,
        n_experts: int,
        *,
        stream: Any = None,
        form: str = "auto",
        tile_m: int | None = None,
        qtype: int | None = None,
    ) -> MoeRoute:
        """Queue the routing pre-pass of the routed forms into this object's workspace (none
        for the gemv form): the expert products of one layer that share these ids pass the
        returned MoeRoute to `moe` instead of routing again. Valid until the next moe_route.
        `qtype`: the experts' format (the integer form is chosen by it)."""
        form = self.moe_form(ntok, form, qtype)
        n_assign = ntok * topk
        tm, ws = 0, None
        if form == "i15":
            tm = tile_m or moe15_tile(ntok)
        if form != "gemv":
            tm = (
                tm
                or tile_m
                or (MOE_SKINNY_TILE_M if form == "skinny" else moe5_tile_m(n_assign, n_experts))
            )
            ws = self._moe_workspace(moe_workspace_bytes(n_assign, n_experts, tm))
            self.run(plan_moe_route(ids, n_assign, n_experts, ws, tile_m=tm), stream)
        self._route_gen += 1
        return MoeRoute(as_buf(ids).ptr, ntok, topk, n_experts, form, tm, self._route_gen, ws)

    def moe(
        self,
        w: QWeight,
        ids: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        y: BufLike,
        *,
        per_slot_input: bool,
        stream: Any = None,
        route: MoeRoute | None = None,
        pair: tuple[QWeight, BufLike, BufLike | None] | None = None,
        planes: BufLike | None = None,
        **kw: Any,
    ) -> None:
        """plan_moe's launch; the routed forms (gemm, skinny) read the routing pre-pass of
        `route` (moe_route with the same ids; queued here first when None), and split K as
        moe_split decides for the shape (gemm: partials in this object's split-K workspace,
        then plan_splitk_reduce with each assignment's expert bias). pair = (w2, y2, bias2):
        a second tensor of w's type and shape over the same x into y2 (the skinny form takes
        both in one launch, the others one after the other). The workspaces are shared by
        every call: queue all MoE launches of one MatmulKernels on one stream (the backend
        does). `planes` (the integer form, token inputs): x's 15-bit codes scaled per 32,
        already written by x's producer, so no pre-pass is queued."""
        form = kw.pop("form", "auto")
        tile_m = kw.pop("tile_m", None)
        if route is None:
            route = self.moe_route(
                ids, ntok, topk, w.experts, stream=stream, form=form, tile_m=tile_m
            )
        self._check_route("moe", route, ids, ntok, topk, w.experts)
        require("moe", form in ("auto", route.form), f"form {form} but routed for {route.form}")
        require(
            "moe", tile_m in (None, route.tile_m), f"tile_m {tile_m}, routed for {route.tile_m}"
        )
        form = route.form
        mats = [(w, y, kw.pop("bias", None))]
        if pair is not None:
            mats.append(pair)
        if form == "i15":
            launches = self._routed_i15(
                mats, ids, ntok, topk, x, per_slot_input, route, kw, planes=planes
            )
        elif planes is not None:
            raise LaunchRefused("moe", f"15-bit planes given to the {form} form")
        elif form == "gemv":
            launches = [
                plan_moe(
                    m,
                    ids,
                    ntok,
                    topk,
                    x,
                    out,
                    per_slot_input=per_slot_input,
                    form=form,
                    bias=b,
                    **kw,
                )
                for m, out, b in mats
            ]
        else:
            launches = self._routed(mats, ids, ntok, topk, x, per_slot_input, route, kw)
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _check_route(
        self, kernel: str, route: MoeRoute, ids: BufLike, ntok: int, topk: int, experts: int
    ) -> None:
        """Refuse a routing that is not the latest pre-pass of these ids and experts (a later
        one overwrote the workspace)."""
        key = (as_buf(ids).ptr, ntok, topk, experts, self._route_gen)
        if (route.ids, route.ntok, route.topk, route.experts, route.gen) != key:
            raise LaunchRefused(
                kernel, f"routing {route} is not the latest one of these ids and experts"
            )

    def moe15_ffn(
        self,
        gate: tuple[QWeight, BufLike | None],
        up: tuple[QWeight, BufLike | None],
        down: tuple[QWeight, BufLike | None],
        ids: BufLike,
        slot_weights: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        out: BufLike,
        route: MoeRoute,
        *,
        swiglu: tuple[float, float] = (1.702, 7.0),
        planes: BufLike | None = None,
        stream: Any = None,
    ) -> None:
        """gpt-oss's expert FFN on the routed integer cores (route.form "i15"), each half
        ending in one launch: quant_x15 of x (ntok rows; none when `planes` holds its codes),
        gate and up (matrix, expert biases) by the routed core into split partials, moe15_glu
        (their in-order sums with the biases, the clamped SwiGLU (alpha, limit), down's
        codes), down by the routed core, moe15_combine (its in-order sum with its biases,
        weighted over each token's slots in order, added into `out`, ntok rows of down's
        width). The bits of moe() for gate and up, swiglu_oai, moe() for down, and
        moe_combine, which it replaces."""
        (wg, bg), (wu, bu), (wd, bd) = gate, up, down
        self._check_route("moe15", route, ids, ntok, topk, wg.experts)
        require("moe15", route.form == "i15", f"routed for the {route.form} form")
        require("moe15", wg.rows == wu.rows == wd.cols, "gate, up and down widths differ")
        n_assign, ff = ntok * topk, wg.rows
        sg, sd = i15_split(wg, self._sms), i15_split(wd, self._sms)
        require("moe15", i15_split(wu, self._sms) == sg, "gate and up split differently")
        half = -(-sg * n_assign * ff * 4 // 256) * 256  # gate's partials, then up's
        ws = self._splitk_workspace(max(2 * half, sd * n_assign * wd.rows * 4))
        gpart = DevBuf(ws.ptr, half)
        upart = DevBuf(ws.ptr + half, ws.nbytes - half)
        launches = []
        if planes is None:
            planes = self._i15_workspace(i15_planes(ntok, wg.cols, 32)[4])
            launches.append(plan_quant_x15(x, planes, ntok, wg.cols, blk=32))
        for m, part in ((wg, gpart), (wu, upart)):
            launches.append(
                plan_moe_i15(
                    m, planes, part, n_assign, sg, route, x_rows=ntok, per_slot_input=False
                )
            )
        # down's codes: the token planes are read by now (one stream), so their workspace
        # takes them unless the producer's planes were given
        dplanes = self._i15_workspace(i15_planes(n_assign, ff, 32)[4])
        alpha, limit = swiglu
        launches.append(
            plan_moe15_glu(
                gpart, upart, sg, n_assign, ff, ids, wg.experts, dplanes,
                gate_bias=bg, up_bias=bu, alpha=alpha, limit=limit,
            )
        )  # fmt: skip
        launches.append(
            plan_moe_i15(wd, dplanes, ws, n_assign, sd, route, x_rows=n_assign, per_slot_input=True)
        )
        launches.append(
            plan_moe15_combine(
                out, ws, sd, ntok, topk, wd.rows, ids, wd.experts, slot_weights,
                bias=bd,
            )
        )  # fmt: skip
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _routed_i15(
        self,
        mats: list[tuple[QWeight, BufLike, BufLike | None]],
        ids: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        per_slot_input: bool,
        route: MoeRoute,
        kw: dict[str, Any],
        *,
        planes: BufLike | None = None,
    ) -> list[Launch]:
        """The integer form: one pre-pass of x (every matrix of `mats` reads the same x;
        none when `planes` holds its codes), then per matrix the routed core into split
        partials and the in-order sum with each assignment's expert bias."""
        require("moe15", not kw.keys() - {"ldx"}, f"options {sorted(kw)} not for the integer form")
        n_assign = ntok * topk
        w0 = mats[0][0]
        x_rows = n_assign if per_slot_input else ntok
        launches = []
        if planes is None:
            planes = self._i15_workspace(i15_planes(x_rows, w0.cols, 32)[4])
            launches.append(plan_quant_x15(x, planes, x_rows, w0.cols, ldx=kw.get("ldx"), blk=32))
        for m, y, b in mats:
            require("moe15", m.cols == w0.cols, "paired experts of another width")
            splits = i15_split(m, self._sms)
            part = self._splitk_workspace(splits * n_assign * m.rows * 4)
            launches.append(
                plan_moe_i15(
                    m,
                    planes,
                    part,
                    n_assign,
                    splits,
                    route,
                    x_rows=x_rows,
                    per_slot_input=per_slot_input,
                )
            )
            launches.append(
                plan_splitk_reduce(
                    part, splits, n_assign, m.rows, y, bias=b, experts=(ids, m.experts)
                )
            )
        return launches

    def _routed(
        self,
        mats: list[tuple[QWeight, BufLike, BufLike | None]],
        ids: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        per_slot_input: bool,
        route: MoeRoute,
        kw: dict[str, Any],
    ) -> list[Launch]:
        n_assign = ntok * topk
        # the workspace the pre-pass wrote (its size is not worked out again)
        common: dict[str, Any] = {
            "per_slot_input": per_slot_input,
            "form": route.form,
            "tile_m": route.tile_m,
            "workspace": route.workspace,
        }
        given = kw.pop("split", None)
        w, y, b = mats[0]
        same = len(mats) == 2 and same_shape(w, mats[1][0])
        if route.form == "skinny" and (len(mats) == 1 or same):
            split = given or moe_split(w)
            pair = mats[1] if same else None
            return [
                plan_moe(w, ids, ntok, topk, x, y, bias=b, pair=pair, split=split, **common, **kw)
            ]
        launches = []
        for m, y, b in mats:
            split = given or moe_split(m)
            out: BufLike = y
            if route.form == "gemm" and split[0] > 1:
                out = self._splitk_workspace(split[0] * n_assign * m.rows * 4)
            launches.append(
                plan_moe(m, ids, ntok, topk, x, out, bias=b, split=split, **common, **kw)
            )
            if out is not y:
                launches.append(
                    plan_splitk_reduce(
                        out, split[0], n_assign, m.rows, y, bias=b, experts=(ids, m.experts)
                    )
                )
        return launches

    def reserve(
        self, max_tokens: int, max_k: int, n_experts: int, topk: int, weights: list[QWeight]
    ) -> None:
        """Size the workspaces for launches of up to max_tokens rows over these weights now,
        so that no launch allocates (a launch inside a graph capture must not)."""
        self._x16_workspace(max_tokens * max_k * 2)
        parts = [gemm_split(w, self._sms)[0] * w.rows for w in weights if w.experts == 1]
        i15w = [w for w in weights if self.takes_i15(w)]
        if i15w:
            # (scales per 32 need the most bytes)
            self._i15_workspace(i15_planes(max_tokens, -(-max_k // 256) * 256, 32)[4])
            tiles = [i15_tiles(w, m) for w in i15w for m in (1, max_tokens)]
            self._i15_tickets(max(tiles, default=1))
            parts += [i15_split(w, self._sms) * w.rows for w in i15w]
        parts += [moe_split(w)[0] * w.rows * topk for w in weights if w.experts > 1]
        moe15 = [w for w in weights if w.experts > 1 and w.qtype in I15_MOE_TYPES]
        if self.int15_experts and moe15:
            self._i15_workspace(i15_planes(max_tokens * topk, max(w.cols for w in moe15), 32)[4])
            # moe15_ffn holds gate's and up's partials at once (+ 256 bytes to align up's)
            parts += [2 * i15_split(w, self._sms) * w.rows * topk + 64 for w in moe15]
        if max(parts, default=1) > 1:
            self._splitk_workspace(max_tokens * max(parts) * 4)
        if n_experts:
            n = max_tokens * topk
            self._moe_workspace(
                max(moe_workspace_bytes(n, n_experts, tm) for tm in (8, MOE_SKINNY_TILE_M, 64, 128))
            )  # (the integer form routes in tiles of 8, 16 or 64)

    def _moe_workspace(self, nbytes: int) -> DevBuf:
        """The routing workspace, grown (never shrunk, never freed while this object lives, so a
        launch still queued on the old one stays valid) to at least nbytes."""
        if self._moe_ws is None or self._moe_ws.nbytes < nbytes:
            import pycuda.driver as drv

            size = max(1 << 16, 1 << (nbytes - 1).bit_length())
            alloc = drv.mem_alloc(size)
            self._moe_ws_keep.append(alloc)
            self._moe_ws = DevBuf(int(alloc), size)
        return self._moe_ws

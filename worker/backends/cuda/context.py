"""The process's one CUDA context (docs/design.md), its stream, plain device allocations and
VRAM accounting, pointer residency checks, and CUDA graphs through `cuda.bindings`.

The context is the device's primary context, retained through PyCUDA and made current on
the thread that creates `CudaContext`; PyCUDA (module loads, launches, copies) and
cuda.bindings (graphs, cuPointerGetAttribute) therefore work on the same context and stream.
Every method must be called from that thread (worker/backends/base.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from loguru import logger

from worker.backends.cuda.arena import DevBuf
from worker.errors import CudaError, VramOom


def _cu() -> Any:
    """cuda.bindings.driver (cuda-bindings >= 12.6), or the older cuda.cuda module."""
    import importlib

    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError:  # pragma: no cover - older layout
        return importlib.import_module("cuda.cuda")


def _check_cu(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings (err, *values) tuple; raise CudaError naming `what`."""
    cu = _cu()
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise CudaError(f"{what}: {name.decode() if isinstance(name, bytes) else name}")
    rest = result[1:]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    index: int
    name: str
    sm: str  # "9.0"
    arch: str  # "sm_90"
    total_bytes: int
    driver_version: str
    multiprocessors: int


class CudaContext:
    """One per process. Owns the stream, every allocation and the graphs made on it."""

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as drv

        self.drv = drv
        drv.init()
        if device < 0 or device >= drv.Device.count():
            raise CudaError(f"GPU {device} does not exist ({drv.Device.count()} visible)")
        dev = drv.Device(device)
        self.device = dev
        self.ctx = dev.retain_primary_context()
        self.ctx.push()
        self.limits_applied: dict[str, str] = {}
        # docs/design.md: no device-side malloc heap, prefer L1 over shared memory.
        try:
            drv.Context.set_limit(drv.limit.MALLOC_HEAP_SIZE, 0)
            self.limits_applied["malloc_heap"] = "0"
        except drv.Error as exc:  # the driver may round the heap up; record what it says
            self.limits_applied["malloc_heap"] = f"refused: {exc}"
        drv.Context.set_cache_config(drv.func_cache.PREFER_L1)
        self.limits_applied["cache_config"] = "prefer_l1"
        self.stream = drv.Stream()
        major, minor = dev.compute_capability()
        ver = drv.get_driver_version()
        self.facts = DeviceFacts(
            index=device,
            name=dev.name(),
            sm=f"{major}.{minor}",
            arch=f"sm_{major}{minor}",
            total_bytes=dev.total_memory(),
            driver_version=f"{ver // 1000}.{(ver % 1000) // 10}",
            multiprocessors=dev.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT),
        )
        self._allocs: dict[int, tuple[Any, int, str]] = {}
        self._closed = False

    # ------------------------------------------------------------------ memory

    def mem_info(self) -> tuple[int, int]:
        free, total = self.drv.mem_get_info()
        return int(free), int(total)

    def alloc(self, nbytes: int, what: str) -> DevBuf:
        """A plain device allocation (cuMemAlloc). Out of memory is VramOom naming `what`."""
        if nbytes <= 0:
            raise ValueError(f"{what}: allocation of {nbytes} bytes")
        try:
            a = self.drv.mem_alloc(nbytes)
        except self.drv.MemoryError as exc:
            free, _ = self.mem_info()
            raise VramOom(
                f"{what}: cannot allocate {nbytes} bytes on GPU {self.facts.index} "
                f"({free} bytes free): {exc}"
            ) from exc
        ptr = int(a)
        self._allocs[ptr] = (a, nbytes, what)
        return DevBuf(ptr, nbytes, what)

    def free(self, buf: DevBuf) -> None:
        entry = self._allocs.pop(buf.ptr, None)
        if entry is not None:
            entry[0].free()

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n, _ in self._allocs.values())

    def allocations(self) -> list[DevBuf]:
        return [DevBuf(p, n, w) for p, (_, n, w) in self._allocs.items()]

    # ------------------------------------------------------------------ copies

    def htod(self, dst: DevBuf, src: Any, offset: int = 0) -> None:
        """Synchronous copy of a host array (any dtype) into dst at offset."""
        nbytes = int(src.nbytes)
        if offset < 0 or offset + nbytes > dst.nbytes:
            raise CudaError(f"htod into {dst.name}: {nbytes} bytes at {offset} overflow")
        self.stream.synchronize()
        self.drv.memcpy_htod(dst.ptr + offset, src)

    def dtoh(self, dst: Any, src: DevBuf, offset: int = 0) -> None:
        nbytes = int(dst.nbytes)
        if offset < 0 or offset + nbytes > src.nbytes:
            raise CudaError(f"dtoh from {src.name}: {nbytes} bytes at {offset} overflow")
        self.sync(f"before reading {src.name}")
        self.drv.memcpy_dtoh(dst, src.ptr + offset)

    def sync(self, what: str) -> None:
        """Wait for the stream; an asynchronous fault becomes CudaError naming `what`."""
        try:
            self.stream.synchronize()
        except self.drv.Error as exc:
            raise CudaError(f"{what}: {exc}") from exc

    def sync_event(self, event: Any, what: str) -> None:
        """Wait for an event recorded on the stream (the work queued before it, not what
        was queued since); a fault becomes CudaError naming `what`."""
        try:
            event.synchronize()
        except self.drv.Error as exc:
            raise CudaError(f"{what}: {exc}") from exc

    # ------------------------------------------------------------------ residency

    def pointer_problem(self, ptr: int) -> str | None:
        """None when ptr is device memory with no host mapping, else what is wrong."""
        cu = _cu()
        attr = cu.CUpointer_attribute
        err, mtype = cu.cuPointerGetAttribute(
            attr.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, cu.CUdeviceptr(ptr)
        )
        if err != cu.CUresult.CUDA_SUCCESS:
            return f"cuPointerGetAttribute(MEMORY_TYPE) failed: {err}"
        if int(mtype) != int(cu.CUmemorytype.CU_MEMORYTYPE_DEVICE):
            return f"memory type {int(mtype)} is not DEVICE"
        err, managed = cu.cuPointerGetAttribute(
            attr.CU_POINTER_ATTRIBUTE_IS_MANAGED, cu.CUdeviceptr(ptr)
        )
        if err == cu.CUresult.CUDA_SUCCESS and int(managed):
            return "managed (unified) memory"
        err, host = cu.cuPointerGetAttribute(
            attr.CU_POINTER_ATTRIBUTE_HOST_POINTER, cu.CUdeviceptr(ptr)
        )
        if err == cu.CUresult.CUDA_SUCCESS and int(host) != 0:
            return f"has a host pointer {int(host):#x}"
        return None

    # ------------------------------------------------------------------ graphs

    def capture(self, pdl: bool | None = None) -> GraphCapture:
        """pdl: make kernel-to-kernel edges programmatic (None: PDL_DEFAULT and sm_90+)."""
        if pdl is None:
            pdl = PDL_DEFAULT and int(self.facts.sm.split(".")[0]) >= 9
        return GraphCapture(self, pdl)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.stream.synchronize()
        for a, _, _ in list(self._allocs.values()):
            with contextlib.suppress(Exception):
                a.free()
        self._allocs.clear()
        with contextlib.suppress(Exception):
            self.ctx.pop()
        with contextlib.suppress(Exception):
            self.ctx.detach()


# Programmatic dependent launch (cuda_src/pdl.cuh): kernels whose every block calls
# pdl_wait() before touching activations or writing; only edges into these become
# programmatic. Names are exact, or prefixes ending in "_" for families made by a macro
# (gemv_<type>...: the dense gemv; not moe_*). tests/unit/cuda/test_pdl.py checks
# this list against the sources. WORKER_ORCD_PDL=0 turns it off.
PDL_KERNELS = (
    "gemv_",
    "gemm2_",
    "gemm3_",
    "gemm_x16",
    "gemm_splitk_reduce",
    "skinny_",
    "embed_",
    "rmsnorm_f32",
    "layernorm_f32",
    "swiglu_f32",
    "swiglu_oai_f32",
    "gelu_f32",
    "add_f32",
    "add_pos_embd_f32",
    "topk_softmax_f32",
    "moe_combine_f32",
    "gather_rows_f32",
    "resolve_pending_ids",
    "attn_paged_decode",
    "attn_prefill_tc_",
    "qkv_rope_store",
    "sample_rows",
    "quant_x15",
    "gemm15p_",
    "gemm15p8_",
    "gemm15pf_",
    "moe15p8_",
    "moe15p16_",
    "moe15p64_",
    "moe15_glu",
    "moe15_combine",
)
PDL_DEFAULT = os.environ.get("WORKER_ORCD_PDL", "1") != "0"


def pdl_aware(name: str) -> bool:
    return any(name.startswith(p) if p.endswith("_") else name == p for p in PDL_KERNELS)


def make_edges_programmatic(graph: Any) -> tuple[int, int]:
    """Turn each kernel -> PDL-aware kernel edge of `graph` (not yet instantiated) into a
    programmatic one: the dependent launches once every block of the first has started
    (griddepcontrol.launch_dependents) and waits in pdl_wait(). Returns (converted, edges)."""
    cu = _cu()
    n = _check_cu(cu.cuGraphGetEdges(graph, 0), "cuGraphGetEdges")[-1]
    if not n:
        return 0, 0
    frm, to, data, n = _check_cu(cu.cuGraphGetEdges(graph, n), "cuGraphGetEdges")
    kernel = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL
    names: dict[int, str | None] = {}

    def kname(node: Any) -> str | None:
        key = int(node)
        if key not in names:
            names[key] = None
            if _check_cu(cu.cuGraphNodeGetType(node), "cuGraphNodeGetType") == kernel:
                params = _check_cu(cu.cuGraphKernelNodeGetParams(node), "kernel node params")
                raw = _check_cu(cu.cuFuncGetName(params.func), "cuFuncGetName")
                names[key] = raw.decode() if isinstance(raw, bytes) else str(raw)
        return names[key]

    pick = [
        i
        for i in range(n)
        if int(data[i].type) == 0  # a default edge
        and kname(frm[i]) is not None
        and pdl_aware(kname(to[i]) or "")
    ]
    if not pick:
        return 0, n
    f, t = [frm[i] for i in pick], [to[i] for i in pick]
    _check_cu(
        cu.cuGraphRemoveDependencies(graph, f, t, [data[i] for i in pick], len(pick)),
        "cuGraphRemoveDependencies",
    )
    edges = []
    for _ in pick:
        e = cu.CUgraphEdgeData()
        e.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
        e.type = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
        edges.append(e)
    _check_cu(cu.cuGraphAddDependencies(graph, f, t, edges, len(pick)), "cuGraphAddDependencies")
    return len(pick), n


class GraphCapture:
    """`with ctx.capture() as cap:` records every launch queued on ctx.stream (PyCUDA
    launches included) into a CUDA graph; `cap.graph` is then an instantiated `CudaGraph`.
    pdl: kernel-to-kernel edges made programmatic before instantiation (see PDL_KERNELS);
    `cap.pdl_edges` = (converted, all edges)."""

    def __init__(self, ctx: CudaContext, pdl: bool = False) -> None:
        self.ctx = ctx
        self.pdl = pdl
        self.pdl_edges = (0, 0)
        self.graph: CudaGraph | None = None

    def __enter__(self) -> GraphCapture:
        cu = _cu()
        self.ctx.sync("before graph capture")
        _check_cu(
            cu.cuStreamBeginCapture(
                cu.CUstream(self.ctx.stream.handle),
                cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            ),
            "cuStreamBeginCapture",
        )
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        cu = _cu()
        res = cu.cuStreamEndCapture(cu.CUstream(self.ctx.stream.handle))
        if exc_type is not None:
            if res[0] == cu.CUresult.CUDA_SUCCESS and res[1] is not None:
                cu.cuGraphDestroy(res[1])
            return
        graph = _check_cu(res, "cuStreamEndCapture")
        plain = None
        try:
            if self.pdl:
                # a driver that refuses the edges or the instantiation gets the graph as
                # captured (no PDL) rather than an error
                plain = _check_cu(cu.cuGraphClone(graph), "cuGraphClone")
                try:
                    self.pdl_edges = make_edges_programmatic(graph)
                    exe = _check_cu(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
                except CudaError as e:
                    logger.warning("programmatic dependent launch not used: {}", e)
                    self.pdl_edges = (0, self.pdl_edges[1])
                    exe = _check_cu(cu.cuGraphInstantiate(plain, 0), "cuGraphInstantiate")
            else:
                exe = _check_cu(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            cu.cuGraphDestroy(graph)
            if plain is not None:
                cu.cuGraphDestroy(plain)
        self.graph = CudaGraph(self.ctx, exe)


class CudaGraph:
    def __init__(self, ctx: CudaContext, exe: Any) -> None:
        self.ctx = ctx
        self.exe = exe

    def launch(self, what: str = "graph") -> None:
        cu = _cu()
        _check_cu(cu.cuGraphLaunch(self.exe, cu.CUstream(self.ctx.stream.handle)), what)

    def destroy(self) -> None:
        if self.exe is not None:
            _cu().cuGraphExecDestroy(self.exe)
            self.exe = None

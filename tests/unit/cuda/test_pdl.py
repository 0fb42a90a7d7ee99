"""Programmatic dependent launch: the list of PDL-aware kernels (context.PDL_KERNELS), whose
incoming decode-graph edges become programmatic, must name only kernels that wait in every
block (cuda_src/pdl.cuh); a kernel listed without the wait would race its predecessor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.backends.cuda.context import PDL_KERNELS, pdl_aware

SRC = Path(__file__).resolve().parents[3] / "cuda_src"


def _sources() -> str:
    return "\n".join(p.read_text() for p in sorted(SRC.glob("*.cu")))


def _body(src: str, name: str) -> str:
    """From the definition of `name` to the next kernel or device function definition."""
    m = re.search(rf"\bvoid\s+(__launch_bounds__\([^)]*\)\s+)?{re.escape(name)}\s*\(", src)
    assert m, f"{name} not found in cuda_src"
    rest = src[m.end() :]
    end = re.search(r'extern "C"|\n(template <|__device__)', rest)
    return rest[: end.start()] if end else rest


@pytest.mark.parametrize("name", [p for p in PDL_KERNELS if not p.endswith("_")])
def test_every_listed_kernel_waits(name: str) -> None:
    body = _body(_sources(), name)
    assert "pdl_start()" in body or "pdl_wait()" in body, f"{name} lists PDL but never waits"


def test_macro_families_wait_in_their_core() -> None:
    src = _sources()
    gemv = _body(src, "gemv4_run")
    # plain/xpf: after the first loads and for a warp without rows; async: both exits
    assert gemv.count("pdl_wait()") >= 3 and "pdl_trigger()" in gemv
    assert "pdl_start()" in _body(src, "embed_row")
    # the families' kernels are made from those cores only
    assert re.search(r"gemv_##NAME##_nb##NB##SUFFIX[^{]*\{\s*\\\s*gemv4_run", src)
    assert re.search(r"embed_##NAME[^{]*\{\s*\\\s*embed_row", src)
    # the tensor-core products: the weights before the wait, X and every write after it
    g2 = _body(src, "run")
    assert g2.count("pdl_wait()") == 2 and "pdl_trigger()" in g2  # fp32 X and fp16 X paths
    assert re.search(r"gemm2_##NAME##_m128[^{]*\{\s*\\\s*g2::run", src)
    # the 15-bit integer cores: every kernel of the families waits first, those made by a
    # macro and those written out
    for family in ("gemm15p", "moe15p"):  # gemm15p_, gemm15p8_, moe15p16_ ...
        macro = rf"{family}\w*##[#\w]*\("  # a kernel name made by a macro
        made = len(re.findall(macro, src))
        waits = len(re.findall(macro + r"[^{]*\{\s*\\\s*pdl_start\(\);", src))
        written = re.findall(rf"void __launch_bounds__\(\d+\) ({family}[a-z0-9_]+)\(", src)
        assert made > 0 and waits == made, family
        for name in written:
            assert _body(src, name).split("{", 1)[1].lstrip().startswith("pdl_start();"), name
    assert pdl_aware("gemm15p8_q4_k") and pdl_aware("gemm15p_q6_k") and pdl_aware("moe15p16_mxfp4")
    assert pdl_aware("gemm15pf_q4_k")
    # the tensor-core prefill attention waits before its body
    assert re.search(r"attn_prefill_tc_d##D\([^{]*\{\s*\\\s*pdl_start\(\);", src)


def test_names_that_must_not_get_programmatic_edges() -> None:
    for name in (
        "moe_gemv_mxfp4",
        "moe_gemm5_mxfp4_m64",
        "moe_route",
    ):
        assert not pdl_aware(name), name
    for name in (
        "gemv_q4_k_nb1",
        "gemv_q8_0_nb1_a_r2",
        "embed_q6_k",
        "rmsnorm_f32",
        "gemm2_q4_k_m64",
    ):
        assert pdl_aware(name), name
    assert not pdl_aware("rmsnorm_f32x")  # exact names are exact


def test_pdl_instructions_only_for_sm90() -> None:
    text = (SRC / "pdl.cuh").read_text()
    assert text.count("__CUDA_ARCH__ >= 900") == 2

"""Context vs KV capacity over NATS (docs/design.md): a worker whose KV cache holds fewer
tokens than its context. A job
inside the context that may need more KV than exists gets `error` VRAM_OOM (retriable, no
`started`), the worker stays healthy and serves the next job; a prompt longer than the
context gets CONTEXT_LENGTH_EXCEEDED (not retriable). Real nats-server, real worker
subprocess on the CPU backend, tiny synthetic model. Jobs that each fit but not all at
once wait for KV blocks and finish with the ids they have alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Error, Started, Token

REF = "tiny-kv"


async def test_vram_oom_when_the_job_outgrows_the_kv_cache(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    # tiny model: 2 layers x 2 KV heads x (32 + 32) x float32 = 1 KiB of KV per token, so
    # 1 MiB holds 1024 tokens under a 2048-token context
    w = spawn_worker(
        tiny_model, nats_server.url, REF, "--ctx-size", "2048", "--kv-cache-size-mb", "1"
    ).wait_ready()
    h = await client.health(w.worker_id)
    assert h.status == "healthy" and h.context_length == 2048  # the job-facing context
    assert h.kv_capacity_tokens == 1024  # what one job can be given: the refusals below

    # "word " is 5 tokens here: ~1500 prompt tokens, inside the context, over the KV
    t0 = time.perf_counter()
    evs = await gather(
        client.generate(REF, prompt="word " * 300, job_id="kv-big", max_tokens=1, timeout_s=30)
    )
    refused_s = time.perf_counter() - t0
    assert len(evs) == 1 and isinstance(evs[0], Error), evs  # no `started`: nothing ran
    err = evs[0]
    assert err.job_id == "kv-big" and err.code is ErrorCode.VRAM_OOM and err.retriable
    assert "holds 1024 tokens" in err.message and "needs 1500 KV cache tokens" in err.message
    print(f"VRAM_OOM answered in {refused_s * 1e3:.1f} ms")

    # a short prompt with max_tokens (capped by the context) that could overflow the KV
    evs = await gather(
        client.generate(REF, prompt="hello", job_id="kv-long-out", max_tokens=1500, timeout_s=30)
    )
    assert len(evs) == 1 and isinstance(evs[0], Error)
    assert evs[0].code is ErrorCode.VRAM_OOM and evs[0].retriable

    assert (await client.health(w.worker_id)).status == "healthy"

    # longer than the context: CONTEXT_LENGTH_EXCEEDED, not retriable
    evs = await gather(
        client.generate(REF, prompt="word " * 500, job_id="kv-ctx", max_tokens=1, timeout_s=30)
    )
    assert len(evs) == 1 and isinstance(evs[0], Error)
    assert evs[0].code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and not evs[0].retriable

    # the next small job completes on the same worker
    evs = await gather(
        client.generate(
            REF, prompt="hello", job_id="kv-small", max_tokens=8, temperature=0, timeout_s=30
        )
    )
    assert isinstance(evs[0], Started) and isinstance(evs[-1], End), evs[-2:]
    assert evs[-1].tokens_out == 8 or evs[-1].stop_reason == "eos"
    assert (await client.health(w.worker_id)).status == "healthy"
    assert w.proc.poll() is None


async def test_jobs_that_fit_alone_but_not_together_wait_for_kv_and_all_finish(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    """KV exhausted by the running batch: a job that fits the cache alone waits for blocks
    (a job is never preempted: recomputing it could change its bits) and then runs; every job
    ends with exactly the ids it has when it runs alone."""
    w = spawn_worker(
        tiny_model,
        nats_server.url,
        REF,
        "--ctx-size",
        "2048",
        "--kv-cache-size-mb",
        "1",  # 1024 tokens of KV
        "--max-batch",
        "8",
    ).wait_ready()
    assert (await client.health(w.worker_id)).max_batch == 8

    def job(k: int, tag: str) -> Any:
        # ~100 prompt tokens + up to 399 fed back: ~500 KV tokens, two at a time fit
        return client.generate(
            REF,
            prompt=f"{k} " + "word " * 20,
            job_id=f"{tag}-{k}",
            max_tokens=400,
            temperature=0.0,
            timeout_s=300,
        )

    together = await asyncio.gather(*(gather(job(k, "kv-together")) for k in range(6)))
    for evs in together:
        assert isinstance(evs[0], Started) and isinstance(evs[-1], End), evs[-1:]
    # the worker held all six but could run only a few at once: some job started only after
    # another had ended
    log = w.events("execute_start", "execute_end")
    first_end = next(i for i, r in enumerate(log) if r["event"] == "execute_end")
    starts_after = [r for r in log[first_end:] if r["event"] == "execute_start"]
    assert starts_after, "every job started before any ended: the KV cache was not the limit"
    for k in range(6):
        alone = await gather(job(k, "kv-alone"))
        ids = [e.id for e in alone if isinstance(e, Token)]
        assert ids == [e.id for e in together[k] if isinstance(e, Token)]
    assert (await client.health(w.worker_id)).status == "healthy"

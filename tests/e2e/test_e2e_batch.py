"""Jobs served together over NATS (real nats-server, real `worker-orcd serve` subprocesses on
the CPU backend): eight concurrent jobs on the real Qwen2.5-Coder-0.5B file each produce
exactly the ids they produce alone; with a full batch running, a cancel ends one job and
leaves the others untouched, kill -9 hands the whole batch to a second worker (every job
completes exactly once), and a nats-server restart loses no job and no event; the JetStream
consumer gives a worker only as many jobs as its batch holds."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from worker.client import OrcdClient, final_attempt
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Error, Event, Started, Token

REF = "batch"
PROMPTS = [
    "def fib(n):",
    "The capital of France is",
    "import numpy as np\n",
    "Once upon a time",
    "SELECT * FROM",
    "# A function that reverses a string\n",
    "1, 2, 3, 5, 8,",
    "<html>",
]


def _ids(events: list[Event]) -> list[int]:
    assert isinstance(events[0], Started) and isinstance(events[-1], End), events[-1:]
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.i for t in tokens] == list(range(len(tokens)))
    return [t.id for t in tokens]


@pytest.mark.slow
async def test_eight_concurrent_jobs_equal_each_alone_real_qwen(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    real_qwen: Path,
    gather: Any,
) -> None:
    w = spawn_worker(
        real_qwen, nats_server.url, REF, "--ctx-size", "128", "--max-batch", "8"
    ).wait_ready(300)
    health = await client.health(w.worker_id)
    assert health.max_batch == 8

    def job(k: int, tag: str) -> Any:
        sampled = k % 2 == 1
        return client.generate(
            REF,
            prompt=PROMPTS[k],
            job_id=f"{tag}-{k}",
            max_tokens=6,
            temperature=0.8 if sampled else 0.0,
            top_k=40 if sampled else 0,
            seed=100 + k,
            timeout_s=600,
        )

    together = await asyncio.gather(*(gather(job(k, "together")) for k in range(8)))
    assert max(e.tokens_out for e in (evs[-1] for evs in together)) > 0  # type: ignore[union-attr]
    # the worker really ran them together: jobs started while others were running
    assert max(r["running_jobs"] for r in w.events("execute_start")) > 1
    # each job's execute_end describes the text it streamed (hash and length, no text)
    ends = {r["job_id"]: r for r in w.wait_events("execute_end", 8)}
    for k, evs in enumerate(together):
        text = "".join(e.t for e in evs if isinstance(e, Token))
        end = ends[f"together-{k}"]
        assert (
            end["output_sha256"]
            == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        ), PROMPTS[k]
        assert end["output_chars"] == len(text) and "output" not in end
    for k in range(8):
        alone = await gather(job(k, "alone"))
        assert _ids(alone) == _ids(together[k]), PROMPTS[k]


async def test_full_batch_cancel_kill_9_and_nats_restart(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path
) -> None:
    """Eight long jobs on two workers of four slots each: the consumer hands each worker
    only four; one job is cancelled (the rest go on); nats-server restarts (nothing lost);
    one worker is killed (its jobs are redelivered to the other, which takes them as its
    own finish); every job ends exactly once, and the replayed stream of each is whole."""
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats")
    srv.start()
    client = await OrcdClient.connect(srv.url)
    try:
        flags = ("--ctx-size", "4096", "--max-batch", "4", "--ack-wait-s", "2")
        a = spawn_worker(tiny_model, srv.url, REF, *flags)
        b = spawn_worker(tiny_model, srv.url, REF, *flags)
        a.wait_ready()
        b.wait_ready()
        seen: dict[str, list[Event]] = {f"j{k}": [] for k in range(8)}

        async def follow(job_id: str, n: int) -> None:
            async for ev in client.generate(
                REF,
                prompt="x",
                job_id=job_id,
                max_tokens=n,
                temperature=0.0,
                timeout_s=300,
                gap_timeout_s=5,
            ):
                seen[job_id].append(ev)

        tasks = [asyncio.create_task(follow(j, 300 if k % 2 else 600)) for k, j in enumerate(seen)]
        deadline = time.monotonic() + 60
        while not all(any(isinstance(e, Token) for e in evs) for evs in seen.values()):
            assert time.monotonic() < deadline, {j: len(v) for j, v in seen.items()}
            await asyncio.sleep(0.05)
        # four jobs a worker: the consumer never handed either more than its batch holds
        for w in (a, b):
            h = await client.health(w.worker_id)
            assert h.running_jobs == 4 and h.max_batch == 4, h
        replies = await client.cancel("j3")
        # the worker running it stops it; the other remembers the cancel in case it gets it
        statuses = [r.status for r in replies]
        assert "cancelling" in statuses and set(statuses) <= {"cancelling", "recorded"}
        srv.stop()  # nats-server goes away with the batch running, and comes back
        srv.start()
        await asyncio.sleep(1.0)
        first = {j: next(e for e in evs if isinstance(e, Started)) for j, evs in seen.items()}
        victim = a if first["j0"].worker_id == a.worker_id else b
        os.kill(victim.pid, signal.SIGKILL)
        # (the survivor finishes up to seven long jobs on a CPU shared with the test)
        await asyncio.wait_for(asyncio.gather(*tasks), 480)
        for job_id, evs in seen.items():
            last = final_attempt(evs)
            if job_id == "j3":
                assert isinstance(last[-1], Error) and last[-1].code is ErrorCode.CANCELLED
                continue
            assert isinstance(last[-1], End), (job_id, last[-1:])
            tokens = [e for e in last if isinstance(e, Token)]
            assert [t.i for t in tokens] == list(range(len(tokens)))
            assert last[-1].tokens_out == len(tokens)
            stored = final_attempt(await client.replay(job_id))
            assert [e for e in stored if isinstance(e, Token)] == tokens  # nothing lost
            ends = [e for e in await client.replay(job_id) if isinstance(e, End)]
            assert len(ends) == 1  # exactly one terminal event of the job
        moved = [j for j, s in first.items() if s.worker_id == victim.worker_id and j != "j3"]
        assert moved, "the killed worker held some of the batch"
    finally:
        await client.close()
        srv.stop()

"""The haiku test on the real Qwen2.5-Coder-0.5B Q4_K_M file (CPU backend): started ->
tokens -> end; the same seed at temperature 0 twice gives identical token ids, and so does the
same seed at temperature 0.7."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker.client import OrcdClient
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Started, Token

REF = "qwen"
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.mark.slow
async def test_haiku_real_qwen(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    real_qwen: Path,
    gather: Any,
) -> None:
    w = spawn_worker(real_qwen, nats_server.url, REF, "--ctx-size", "256").wait_ready(300)
    health = await client.health(w.worker_id)
    assert health.quant_kind == "Q4_K_M" and health.vocab_size == 151936

    async def run(job_id: str, temperature: float) -> tuple[list[int], str]:
        evs = await gather(
            client.generate(
                REF,
                messages=HAIKU,
                job_id=job_id,
                max_tokens=10,
                temperature=temperature,
                seed=42,
                timeout_s=600,
            )
        )
        assert isinstance(evs[0], Started) and evs[0].seed == 42 and evs[0].prompt_tokens > 10
        assert isinstance(evs[-1], End), evs[-1]
        tokens = [e for e in evs if isinstance(e, Token)]
        assert [t.i for t in tokens] == list(range(len(tokens))) and tokens
        assert evs[-1].tokens_out == len(tokens)
        return [t.id for t in tokens], "".join(t.t for t in tokens)

    greedy_a, text = await run("haiku-t0-a", 0.0)
    greedy_b, _ = await run("haiku-t0-b", 0.0)
    assert greedy_a == greedy_b
    assert text.strip(), text  # real words from the real model
    print(f"haiku (greedy, 10 tokens): {text!r}")
    warm_a, _ = await run("haiku-t07-a", 0.7)
    warm_b, _ = await run("haiku-t07-b", 0.7)
    assert warm_a == warm_b

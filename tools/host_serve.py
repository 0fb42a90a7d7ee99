"""The serving path's host cost, without a GPU: `serve` on an emulated device, and N closed-loop
clients over NATS against it (BENCHMARKS.md). Reports the clients' figures and the worker's
CPU time by thread over the phases (warm-up rounds included) and a token.

    python -m tools.host_serve --model GGUF [--concurrency 64] [--jobs-per-client 4] \
        [--step-ms 1.2] [--row-us 20] [--prompt-token-us 25] [--host-us 0] [-- SERVE FLAGS]

Everything is real except the device: a `worker-orcd serve` subprocess (NATS, the actors, the
scheduler, the CUDA backend's per-step host work of `tools.host_step`), an embedded
nats-server, and the clients of `bench --suite --concurrency`. The emulated device runs steps
in launch order and takes `step_ms` + `row_us` a sampled row + `prompt_token_us` a prompt
token for each (defaults near the full-size Qwen2.5-0.5B layout on an H200: 2.5 ms a step of
64 rows), sleeping with the GIL released as a CUDA event wait does; `host_us` of busy Python
a launch stands for the real backend's host work beyond the layout. Every sampled token is
the same ordinary word, so jobs end at max_tokens. What the clients measure beyond those
device times is host time: the worker's, nats-server's and the clients' own. With a short
device time (e.g. `--step-ms 0.3 --row-us 5`) the aggregate is the host's capacity.

The worker side runs as ``python -m tools.host_serve --worker SERVE ARGS`` (the loader is
swapped for the emulated one, the rest is `worker.cli.main`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.host_step import HostOnlyBackend
from worker.backends.base import BackendInfo, ResidencyReport
from worker.engine.batch import Chunk, StepOutput

EMULATED = "ORCD_EMULATED_DEVICE"  # "step_ms,row_us,prompt_token_us,host_us" for the worker


class EmulatedDevice(HostOnlyBackend):
    """HostOnlyBackend whose steps take device time: each starts when it is launched or when
    the one before it ends (one stream), whichever is later, and `collect` sleeps until it
    ends."""

    def __init__(
        self, token_id: int, step_ms: float, row_us: float, prompt_token_us: float, host_us: float
    ):
        super().__init__()
        self.host_s = host_us / 1e6
        self.token_id = token_id
        self.step_s = step_ms / 1e3
        self.row_s = row_us / 1e6
        self.prompt_token_s = prompt_token_us / 1e6
        self.busy_until = 0.0
        self.info = BackendInfo(device="cpu", resident=True)

    def launch(self, chunks: Sequence[Chunk]) -> Any:
        super().launch(chunks)
        burn = time.perf_counter() + self.host_s
        while time.perf_counter() < burn:  # the backend's other host work, GIL held
            pass
        rows = sum(c.sample is not None for c in chunks)
        prompt = sum(len(c.tokens) for c in chunks if c.prefill)
        cost = self.step_s + rows * self.row_s + prompt * self.prompt_token_s
        self.busy_until = max(time.perf_counter(), self.busy_until) + cost
        return chunks, self.busy_until

    def collect(self, handle: Any) -> StepOutput:
        chunks, done = handle
        left = done - time.perf_counter()
        if left > 0:
            time.sleep(left)
        ids = [self.token_id if c.sample is not None else -1 for c in chunks]
        return StepOutput(ids=ids, logits=[None] * len(chunks))

    def check_residency(self) -> ResidencyReport:
        return ResidencyReport(ok=True, checked=0)

    def close(self) -> None:
        pass


def _emulated_loader(step_ms: float, row_us: float, prompt_token_us: float, host_us: float) -> Any:
    from actors.loader import LoadedModel
    from worker.config import WorkerConfig
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    def load(cfg: WorkerConfig) -> LoadedModel:
        gf = open_gguf(cfg.model)
        tok = load_tokenizer(gf.metadata, model_path=cfg.model)
        dev = EmulatedDevice(tok.encode(" the")[-1], step_ms, row_us, prompt_token_us, host_us)
        if cfg.max_batch is not None:
            dev.max_batch = cfg.max_batch
        return LoadedModel(
            backend=dev,  # type: ignore[arg-type]
            tokenizer=tok,
            model_name="emulated",
            quant_kind="none",
            architecture=gf.architecture,
            load_seconds=0.0,
            context_length=dev.context_length,
        )

    return load


def worker_main(argv: list[str]) -> int:
    import actors.inference
    from worker.cli import main

    step_ms, row_us, prompt_us, host_us = (float(x) for x in os.environ[EMULATED].split(","))
    actors.inference.load_model_blocking = _emulated_loader(step_ms, row_us, prompt_us, host_us)
    return main(argv)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of process `pid` has used, by "name/tid"."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def clients_main(args: argparse.Namespace) -> dict[str, Any]:
    from tools.live import WorkerProc, shutdown_and_wait, wait_healthy
    from tools.suite import LiveSuiteOptions, concurrency_phases, prompt_of_tokens
    from worker.client import OrcdClient
    from worker.nats.server import EmbeddedNatsServer

    prompt, n_prompt = prompt_of_tokens(args.model, args.prompt_tokens)
    env = {EMULATED: f"{args.step_ms},{args.row_us},{args.prompt_token_us},{args.host_us}"}
    out: dict[str, Any] = {"prompt_tokens": n_prompt, "device": env[EMULATED]}
    with EmbeddedNatsServer() as server:
        w = WorkerProc(
            args.model,
            server.url,
            "host-serve",
            *args.serve_flags,
            env=env,
            module="tools.host_serve",
            module_args=["--worker"],
        )
        try:
            client = await OrcdClient.connect(server.url)
            await wait_healthy(client, w, timeout=120)

            def ends() -> list[dict[str, Any]]:
                return [r for r in w.records if r.get("event") == "execute_end"]

            before = thread_cpu(w.proc.pid)
            out["phases"], phase_ends = [], []
            for n in args.concurrency:
                opts = LiveSuiteOptions(
                    model=args.model,
                    model_ref="host-serve",
                    concurrency=[n],
                    jobs_per_client=args.jobs_per_client,
                    max_tokens=args.max_tokens,
                )
                done = len(ends())
                (phase,) = await concurrency_phases(opts, server.url, prompt)
                out["phases"].append(phase)
                # the worker logs a job's end as the client sees it: wait for the lines of
                # the warm-up round (n jobs, all ended before the phase began) and the phase
                want = done + n + phase["jobs"]
                for _ in range(100):
                    if len(ends()) >= want:
                        break
                    await asyncio.sleep(0.05)
                phase_ends += ends()[done + n : want]
            after = thread_cpu(w.proc.pid)
            used = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
            tokens = sum(p["tokens"] for p in out["phases"])
            out["worker_cpu_s"] = dict(sorted(used.items(), key=lambda kv: -kv[1])[:4])
            out["worker_cpu_us_a_token"] = round(sum(used.values()) / tokens * 1e6, 1)
            # the worker's own first-token time (receipt to first sampled token) over the
            # phases' jobs (not the warm-ups'): the rest of the clients' TTFT is NATS,
            # JetStream and the clients
            ttft = sorted(r["ttft_ms"] for r in phase_ends)
            if ttft:
                out["worker_ttft_ms"] = {
                    "p50": ttft[len(ttft) // 2],
                    "p95": ttft[int(len(ttft) * 0.95)],
                }
            await shutdown_and_wait(client, w)
            await client.close()
        finally:
            w.stop()
    return out


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="GGUF file (its tokenizer)")
    p.add_argument("--concurrency", default="64", help="comma list of client counts")
    p.add_argument("--jobs-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=1.2)
    p.add_argument("--row-us", type=float, default=20.0)
    p.add_argument("--prompt-token-us", type=float, default=25.0)
    p.add_argument("--host-us", type=float, default=0.0, help="CPU held a launch")
    p.add_argument("serve_flags", nargs="*", help="after --: flags for serve")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    print(json.dumps(asyncio.run(clients_main(args)), indent=1))


if __name__ == "__main__":
    main()

"""Helpers of the gateway end-to-end tests (imported by the test modules beside it)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2
import openai

from worker.gateway.live import GatewayProc


def sdk(gw: GatewayProc, api_key: str = "no-key", timeout: float = 120.0) -> openai.AsyncOpenAI:
    """The real openai SDK pointed at the gateway (no retries: every status is seen as is)."""
    return openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout
    )


def http(gw: GatewayProc, timeout: float = 120.0) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url=gw.url, timeout=timeout)


async def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if "{" in key:
            base, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(",")))
        else:
            base, got = key, ""
        if base == name and got == want:
            return float(value)
    return 0.0

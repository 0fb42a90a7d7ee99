"""Job leases (abandoned jobs): a job may carry ``lease_s``; its client renews it on
``orcd.keepalive.<job_id>``; a job whose lease ran out is ended ``CANCELLED`` with reason
``client_gone``, so no device time goes to work nobody reads.

This module only keeps the books and knows nothing of the inference path. The frontend
drives it: `hold` when it takes a job with a lease (running or waiting here), `renew` for
every keepalive message, `release` once the job's terminal event is out, `expired` from a
ticker (`watch`), whose expired jobs go to the cancellation actor through the same channel,
and as the same message, as an ``orcd.cancel`` request with ``reason: "client_gone"``.

Keepalives for jobs this worker does not hold (yet) are remembered for a while (bounded),
so a job whose client vanished while it waited in the queue is ended as soon as it is
taken, not a whole lease later. After a NATS outage every held lease is renewed: no client
could reach the worker meanwhile.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from worker.narration import narrate

WATCH_PERIOD_S = 0.1


@dataclass
class Lease:
    lease_s: float
    deadline: float
    fired: bool = False


class LeaseTable:
    def __init__(self, seen_max: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._held: dict[str, Lease] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()  # keepalives of jobs not held
        self._seen_max = seen_max
        self._clock = clock

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, job_id: str, lease_s: float) -> None:
        """This worker took `job_id`: its lease runs from the last keepalive seen for it
        (if any came in while it waited), else from now."""
        now = self._clock()
        start = min(now, self._seen.pop(job_id, now))
        self._held[job_id] = Lease(lease_s, start + lease_s)

    def renew(self, job_id: str) -> None:
        now = self._clock()
        lease = self._held.get(job_id)
        if lease is not None:
            lease.deadline = max(lease.deadline, now + lease.lease_s)
            return
        self._seen[job_id] = now
        self._seen.move_to_end(job_id)
        while len(self._seen) > self._seen_max:
            self._seen.popitem(last=False)

    def renew_all(self) -> None:
        """After an outage: nobody could renew meanwhile, so every held lease starts anew."""
        now = self._clock()
        for lease in self._held.values():
            if not lease.fired:
                lease.deadline = max(lease.deadline, now + lease.lease_s)

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)

    def expired(self) -> list[tuple[str, float]]:
        """(job_id, lease_s) of held jobs whose lease ran out, each reported once."""
        now = self._clock()
        out: list[tuple[str, float]] = []
        for job_id, lease in self._held.items():
            if not lease.fired and now >= lease.deadline:
                lease.fired = True
                out.append((job_id, lease.lease_s))
        return out


async def watch(
    table: LeaseTable,
    end_job: Callable[[str], Awaitable[None]],
    connected: Callable[[], bool],
    period_s: float = WATCH_PERIOD_S,
) -> None:
    """Every `period_s` (until cancelled): end each job whose lease ran out with
    `end_job(job_id)`. Nothing expires while NATS is away (no keepalive could arrive)."""
    while True:
        await anyio.sleep(period_s)
        if not connected():
            continue
        for job_id, lease_s in table.expired():
            narrate(
                "lease_expired",
                f"no keepalive for {lease_s:g} s: ending the job (client_gone)",
                level="WARNING",
                job_id=job_id,
                lease_s=lease_s,
            )
            await end_job(job_id)

"""Protocol events as a worker stores them in ORCD_EVENTS, for tests that write or compare
stored events (fields the tests do not look at filled in)."""

from __future__ import annotations

from worker.protocol import End, Started


def stored_started(job_id: str, attempt: int) -> Started:
    """A `started` event as a worker stores it."""
    return Started(
        job_id=job_id, model="m", started_at="t", seed=1, prompt_tokens=1, attempt=attempt
    )


def stored_end(job_id: str, tokens_out: int) -> End:
    """An `end` event as a worker stores it after `tokens_out` tokens."""
    return End(
        job_id=job_id,
        tokens_out=tokens_out,
        stop_reason="max_tokens",
        prompt_tokens=1,
        ttft_ms=1.0,
        decode_time_ms=1.0,
        tokens_per_s=1.0,
    )

"""EventPublisher against a real nats-server: a job attempt's events land in ORCD_EVENTS in
order, each with its Nats-Msg-Id, whether framed into nats-py's buffer (the path taken while
connected) or sent through nats-py's publish (the other one); the ids make a re-send a
duplicate the stream drops; finish() stores the terminal event after all of them."""

from __future__ import annotations

import pytest

from worker.nats.jetstream import EventPublisher, connect, ensure_streams
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import EVENTS_STREAM, End, Subjects, Token, decode_event, encode


def _token(job_id: str, i: int) -> bytes:
    return encode(Token(job_id=job_id, i=i, t=f' w{i}\n"x"', id=1000 + i))


@pytest.mark.parametrize("framed", [True, False])
async def test_events_stored_in_order_with_their_ids(
    nats_server: EmbeddedNatsServer, framed: bool
) -> None:
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        subjects = Subjects()
        await ensure_streams(js, subjects, events_max_age_s=600)
        job = f"job-{framed}"
        subject = subjects.events(job)
        pub = EventPublisher(nc, js, subject, f"{job}.7.1", EVENTS_STREAM)
        # the installed nats-py has the buffer the framed path appends to
        assert pub._hpub is not None
        if not framed:
            pub._hpub = None
        await pub.start()
        n = 300
        for i in range(n):
            await pub.publish(_token(job, i))
        end = End(
            job_id=job,
            tokens_out=n,
            stop_reason="max_tokens",
            prompt_tokens=3,
            ttft_ms=1.0,
            decode_time_ms=2.0,
            tokens_per_s=3.0,
        )
        assert await pub.finish(encode(end))
        assert pub.republished == 0  # every plain publish was stored

        info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
        assert (info.state.subjects or {}).get(subject) == n + 1
        first = info.state.first_seq
        got = [await js.get_msg(EVENTS_STREAM, first + k) for k in range(n + 1)]
        assert [m.subject for m in got] == [subject] * (n + 1)
        assert [(m.headers or {}).get("Nats-Msg-Id") for m in got] == [
            f"{job}.7.1.{k}" for k in range(n + 1)
        ]
        assert [m.data for m in got[:n]] == [_token(job, i) for i in range(n)]
        assert decode_event(got[n].data) == end

        # a re-send of stored events (what finish() does after an outage) adds nothing
        for k in (0, 150, n - 1):
            ack = await js.publish(
                subject, _token(job, k), headers={"Nats-Msg-Id": f"{job}.7.1.{k}"}
            )
            assert ack.duplicate
        info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
        assert (info.state.subjects or {}).get(subject) == n + 1
    finally:
        await nc.close()


async def test_count_is_the_subjects_own_and_a_missing_stream_raises(
    nats_server: EmbeddedNatsServer,
) -> None:
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        subjects = Subjects()
        await ensure_streams(js, subjects, events_max_age_s=600)
        for job, n in (("a", 3), ("b", 5)):
            for i in range(n):
                await js.publish(subjects.events(job), _token(job, i))
        pub = EventPublisher(nc, js, subjects.events("a"), "a.1.1", EVENTS_STREAM)
        assert await pub._count() == 3
        none = EventPublisher(nc, js, subjects.events("c"), "c.1.1", EVENTS_STREAM)
        assert await none._count() == 0
        missing = EventPublisher(nc, js, subjects.events("a"), "a.1.1", "NO_SUCH_STREAM")
        with pytest.raises(Exception, match="stream not found"):
            await missing._count()
        await missing.start(deadline_s=0.3)  # gives up: finish() will re-send, confirmed
        assert missing._base is None
    finally:
        await nc.close()

"""EventPublisher against a real nats-server: a job attempt's events land in ORCD_EVENTS in
order, each with its Nats-Msg-Id, whether framed into nats-py's buffer (the path taken while
connected) or sent through nats-py's publish (the other one); the ids make a re-send a
duplicate the stream drops; finish() stores the terminal event after all of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from tests.e2e.stored_events import stored_end
from worker.nats.jetstream import EventPublisher, connect, ensure_streams
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import EVENTS_STREAM, Subjects, Token, decode_event, encode

SUBJECTS = Subjects()


@pytest.fixture
async def nats(nats_server: EmbeddedNatsServer) -> AsyncIterator[tuple[NatsClient, Any]]:
    """(connection, its JetStream context) with the worker's streams in place."""
    nc = await connect(nats_server.url, name="test")
    try:
        js = nc.jetstream()
        await ensure_streams(js, SUBJECTS, events_max_age_s=600)
        yield nc, js
    finally:
        await nc.close()


def _token(job_id: str, i: int) -> bytes:
    return encode(Token(job_id=job_id, i=i, t=f' w{i}\n"x"', id=1000 + i))


@pytest.mark.parametrize("framed", [True, False])
async def test_events_stored_in_order_with_their_ids(
    nats: tuple[NatsClient, Any], framed: bool
) -> None:
    nc, js = nats
    job = f"job-{framed}"
    subject = SUBJECTS.events(job)
    pub = EventPublisher(nc, js, subject, f"{job}.7.1", EVENTS_STREAM)
    # the installed nats-py has the buffer the framed path appends to
    assert pub._hpub is not None
    if not framed:
        pub._hpub = None
    await pub.start()
    n = 300
    for i in range(n):
        await pub.publish(_token(job, i))
    end = stored_end(job, n)
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
        ack = await js.publish(subject, _token(job, k), headers={"Nats-Msg-Id": f"{job}.7.1.{k}"})
        assert ack.duplicate
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    assert (info.state.subjects or {}).get(subject) == n + 1


async def test_count_is_the_subjects_own_and_a_missing_stream_raises(
    nats: tuple[NatsClient, Any],
) -> None:
    nc, js = nats
    for job, n in (("a", 3), ("b", 5)):
        for i in range(n):
            await js.publish(SUBJECTS.events(job), _token(job, i))
    pub = EventPublisher(nc, js, SUBJECTS.events("a"), "a.1.1", EVENTS_STREAM)
    assert await pub._count() == 3
    none = EventPublisher(nc, js, SUBJECTS.events("c"), "c.1.1", EVENTS_STREAM)
    assert await none._count() == 0
    missing = EventPublisher(nc, js, SUBJECTS.events("a"), "a.1.1", "NO_SUCH_STREAM")
    with pytest.raises(Exception, match="stream not found"):
        await missing._count()
    await missing.start(deadline_s=0.3)  # gives up: finish() will re-send, confirmed
    assert missing._base is None

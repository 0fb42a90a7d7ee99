"""Cancellation actor: ``orcd.cancel`` requests in, `CancelJob` messages out.

The frontend hands every cancel message over raw; this actor validates it (a bad payload is
answered with an error reply and goes no further) and passes the cancel to the inference
actor, which alone knows which jobs run or wait here. There it takes effect at the next step
boundary: a running or queued job ends with ``CANCELLED`` and the reply says
``cancelling``; a job this worker finished says ``already_finished``; any other job id is
remembered for an hour (``recorded``), so that if this worker reaches the job it ends
``CANCELLED`` without running. Repeats are idempotent (``already_recorded``).

A cancel may carry a reason (``client_gone`` when a job's lease ran out: the frontend's
lease watch sends its cancels down the same channel); it goes on the job's CANCELLED event
(``reason`` field, and said in the message).
"""

from __future__ import annotations

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.messages import CancelJob, CancelPayload, InferenceIn, Outgoing, Reply
from worker.errors import WorkerError
from worker.narration import narrate
from worker.protocol import CLIENT_GONE, ErrorReply, decode_cancel, encode

_REASON_TEXT = {CLIENT_GONE: "its client stopped renewing the job's lease"}


async def cancellation_actor(
    inbox: MemoryObjectReceiveStream[CancelPayload],
    inference: MemoryObjectSendStream[InferenceIn],
    replies: MemoryObjectSendStream[Outgoing],
) -> None:
    async with inbox, inference, replies:
        async for msg in inbox:
            try:
                req = decode_cancel(msg.data)
            except WorkerError as exc:
                narrate("cancel_invalid", exc.message, level="WARNING")
                if msg.reply_to:
                    payload = encode(ErrorReply(error=exc.code, message=exc.message))
                    await replies.send(Reply(msg.reply_to, payload))
                continue
            if req.reason is None:
                await inference.send(CancelJob(req.job_id, msg.reply_to))
                continue
            text = _REASON_TEXT.get(req.reason, req.reason)
            await inference.send(
                CancelJob(
                    req.job_id,
                    msg.reply_to,
                    reason=f"job cancelled ({req.reason}: {text})",
                    code=req.reason,
                )
            )

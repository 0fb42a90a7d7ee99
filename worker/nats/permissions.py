"""Least-privilege NATS permissions of a worker user and a client user (docs/security.md).

Each function returns the ``permissions`` block of a nats-server user, as a dict; `render`
writes it in nats-server's configuration syntax (JSON is a subset of it). The e2e test
(tests/e2e/test_e2e_security.py) runs a worker and a client on a real nats-server with
exactly these blocks, so they are known to be enough, and known to keep a client from
shutting a worker down, publishing events or reading jobs.

Replies: the worker answers requests (health, cancel, metrics, shutdown) on the requester's
reply subject, which ``allow_responses`` permits for those replies only. Each user receives
its own replies (JetStream API answers, publish acks, request replies) on its own inbox
prefix (``--nats-inbox-prefix``), so neither can subscribe to the other's inboxes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from worker.nats.jetstream import stream_names
from worker.protocol import Subjects

WORKER_INBOX = "_INBOX_worker"
CLIENT_INBOX = "_INBOX_client"


def worker_permissions(prefix: str = "orcd", inbox_prefix: str = WORKER_INBOX) -> dict[str, Any]:
    """A worker: takes jobs from its consumer, publishes events, answers control requests.
    It may create the two streams and the model's consumer (``$JS.API.STREAM.CREATE``,
    ``$JS.API.CONSUMER.*CREATE``); drop those if an operator creates them beforehand."""
    s = Subjects(prefix)
    jobs, events = stream_names(s)
    return {
        "publish": {
            "allow": [
                s.events_wildcard,
                f"{prefix}.heartbeat.*",
                s.rejected,
                f"$JS.API.STREAM.INFO.{jobs}",
                f"$JS.API.STREAM.INFO.{events}",
                f"$JS.API.STREAM.CREATE.{jobs}",
                f"$JS.API.STREAM.CREATE.{events}",
                f"$JS.API.CONSUMER.CREATE.{jobs}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{jobs}.>",
                f"$JS.API.CONSUMER.INFO.{jobs}.>",
                f"$JS.API.CONSUMER.MSG.NEXT.{jobs}.>",
                f"$JS.ACK.{jobs}.>",  # ack, in-progress, nak, term
                f"$JS.API.STREAM.MSG.GET.{jobs}",  # a job out of deliveries: read its id
                f"$JS.API.STREAM.MSG.DELETE.{jobs}",  # ... and remove it
            ]
        },
        "subscribe": {
            "allow": [
                s.health_all,
                f"{prefix}.health.*",
                f"{prefix}.metrics.*",
                s.cancel,
                f"{prefix}.control.*.shutdown",
                s.keepalive_wildcard,
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{jobs}.*",
                f"{inbox_prefix}.>",
            ]
        },
        "allow_responses": True,
    }


def client_permissions(
    prefix: str = "orcd", inbox_prefix: str = CLIENT_INBOX, model_refs: Sequence[str] = (">",)
) -> dict[str, Any]:
    """A client: submits jobs (for `model_refs`, default any), reads and replays events,
    cancels, renews leases, asks health. No shutdown, no events of its own, no reading of
    the job queue (other clients' prompts), no stream or consumer administration."""
    s = Subjects(prefix)
    _, events = stream_names(s)
    return {
        "publish": {
            "allow": [
                *(s.jobs(ref) for ref in model_refs),
                s.cancel,
                s.health_all,
                f"{prefix}.health.*",
                s.keepalive_wildcard,
                # replay: an ephemeral consumer on the events stream, read, then deleted
                f"$JS.API.CONSUMER.CREATE.{events}",
                f"$JS.API.CONSUMER.CREATE.{events}.>",
                f"$JS.API.CONSUMER.INFO.{events}.*",
                f"$JS.API.CONSUMER.MSG.NEXT.{events}.*",
                f"$JS.API.CONSUMER.DELETE.{events}.*",
            ]
        },
        "subscribe": {"allow": [s.events_wildcard, f"{prefix}.heartbeat.*", f"{inbox_prefix}.>"]},
    }


def render(permissions: dict[str, Any]) -> str:
    """The block in nats-server configuration syntax."""
    return json.dumps(permissions, indent=2)

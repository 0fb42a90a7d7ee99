"""The gateway's Prometheus metrics (``GET /metrics``), as the gateway sees them: requests by
endpoint and status, time to first token and inter-token gaps on the streams it relays (from
the request's arrival / the previous token written), open streams, client disconnects."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "orcd_gateway_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "orcd_gateway_time_to_first_token_seconds",
            "From a completion request's arrival to its first token written to the client",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "orcd_gateway_inter_token_seconds",
            "Between two tokens written to a streaming client",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.open_streams = Gauge(
            "orcd_gateway_open_streams", "Streaming responses in progress", registry=r
        )
        self.in_flight = Gauge(
            "orcd_gateway_requests_in_flight",
            "Completion requests in progress (streamed or not)",
            registry=r,
        )
        self.disconnects = Counter(
            "orcd_gateway_client_disconnects",
            "Clients that went away before their job ended (the job was cancelled)",
            registry=r,
        )
        self.workers = Gauge(
            "orcd_gateway_workers", "Live workers seen, by model ref", ["model_ref"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

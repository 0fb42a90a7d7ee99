"""OpenAI-compatible HTTP gateway over the NATS interface (docs/gateway.md).

- `translate`: OpenAI request bodies -> validated `Job`s (unsupported parameters refused);
- `render`: worker events -> OpenAI responses and SSE chunks (pre-rendered per stream);
- `app`: the ASGI application (Starlette routing; the completion endpoints are plain ASGI);
- `server`: NATS connection, worker discovery, uvicorn; `auth`, `metrics`, `errors`;
- `bench`: the gateway's added latency against the same jobs over NATS directly.
"""

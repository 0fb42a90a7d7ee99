"""worker-orcd: a single-GPU LLM inference worker serving GGUF models behind NATS."""

__version__ = "0.1.0"

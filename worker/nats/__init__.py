"""NATS: connection, JetStream streams and consumers, embedded nats-server, public client."""

"""Credentials and TLS handed to child processes as WORKER_ORCD_NATS_* variables: what a tool
that starts workers (bench --suite, gateway-bench) passes on is what those workers read."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from worker.nats.options import (
    NatsConnectOptions,
    add_nats_connect_arguments,
    connect_flags_given,
    nats_connect_options,
    url_connect_options,
)


def test_environ_round_trips_through_the_reader(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for f in (ca, cert, key):
        f.write_text("-")
    cases = [
        NatsConnectOptions(),
        NatsConnectOptions(token="t-secret"),
        NatsConnectOptions(
            user="u",
            password="p w",
            tls_ca=ca,
            tls_cert=cert,
            tls_key=key,
            tls_hostname="nats.internal",
            inbox_prefix="_INBOX_u",
        ),
    ]
    for opts in cases:
        env = opts.environ()
        assert all(k.startswith("WORKER_ORCD_NATS_") for k in env)
        assert nats_connect_options(argparse.Namespace(), environ=env) == opts
    assert NatsConnectOptions(token="t").environ() == {"WORKER_ORCD_NATS_TOKEN": "t"}


def test_connect_flags_given_names_command_line_flags_only() -> None:
    p = argparse.ArgumentParser()
    add_nats_connect_arguments(p)
    assert connect_flags_given(p.parse_args([])) == []
    args = p.parse_args(["--nats-token", "x", "--nats-tls-hostname", "h"])
    assert connect_flags_given(args) == ["--nats-token", "--nats-tls-hostname"]
    # a flag wins over its variable; the environment is not a flag (a tool may ignore it
    # where it does not apply)
    assert nats_connect_options(args, environ={"WORKER_ORCD_NATS_TOKEN": "y"}).token == "x"
    with pytest.raises(ValueError, match="one kind"):
        nats_connect_options(
            args, environ={"WORKER_ORCD_NATS_USER": "u", "WORKER_ORCD_NATS_PASSWORD": "p"}
        )


def test_url_connect_options_only_for_a_given_server() -> None:
    """The tools that start their own nats-server: credentials belong to --nats-url only."""
    p = argparse.ArgumentParser()
    p.add_argument("--nats-url")
    add_nats_connect_arguments(p)
    assert url_connect_options(p.parse_args([])) is None
    with pytest.raises(ValueError, match="--nats-token: only with --nats-url"):
        url_connect_options(p.parse_args(["--nats-token", "x"]))
    got = url_connect_options(p.parse_args(["--nats-url", "nats://h:4222", "--nats-token", "x"]))
    assert got == NatsConnectOptions(token="x")


def test_nats_read_loop_errors_print_no_traceback() -> None:
    """nats-py logs what ends its read loop with a traceback; through `connect`'s filter the
    harmless InvalidStateError of a cancelled ping (Ctrl-C) is dropped and anything else
    becomes one line."""
    import asyncio
    import io
    import logging

    from worker.nats.jetstream import _READ_LOOP_FILTER

    log = logging.getLogger("nats-read-loop-test")
    log.propagate = False
    log.addFilter(_READ_LOOP_FILTER)
    buf = io.StringIO()
    log.addHandler(logging.StreamHandler(buf))
    for exc in (asyncio.InvalidStateError("invalid state"), ValueError("boom")):
        try:
            raise exc
        except Exception as e:
            log.error("nats: encountered error", exc_info=e)
    assert buf.getvalue() == "nats: encountered error: ValueError: boom\n"

"""How a process authenticates to NATS and secures the connection: one option set for every
command that connects (`serve`, `submit`, `health`, and the gateway), and for
`worker.client.OrcdClient.connect`.

- credentials: user and password, a token, an NKey seed file, or a ``.creds`` file (user JWT
  and NKey seed, for servers in operator/JWT mode); a user and password inside the URL
  (``nats://user:pass@host:4222``) work as well;
- TLS: a CA bundle to verify the server, a client certificate and key (mutual TLS), the
  server name to expect; a ``tls://`` URL turns TLS on with the system's CAs;
- an inbox prefix (``--nats-inbox-prefix``), so a user's permissions can allow replies on
  its own inboxes only (``_INBOX_worker.>``) instead of every ``_INBOX.>``;
- several servers: ``--nats-url`` takes a comma-separated list (the nodes of a cluster).

Every flag falls back to ``WORKER_ORCD_NATS_<NAME>`` in the environment (``--nats-password``
-> ``WORKER_ORCD_NATS_PASSWORD``): secrets belong in the environment or in files, not on a
command line every user of the host can read. docs/security.md has the least-privilege
permissions of a worker user and a client user (worker/nats/permissions.py renders them).

    p = argparse.ArgumentParser(); add_nats_connect_arguments(p)
    opts = nats_connect_options(p.parse_args())
    nc = await worker.nats.jetstream.connect(url, name="x", options=opts)
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "WORKER_ORCD_NATS_"


@dataclass(frozen=True, slots=True)
class NatsConnectOptions:
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: Path | None = None  # a file holding the user's NKey seed (SU...)
    creds: Path | None = None  # a .creds file: user JWT and NKey seed
    tls_ca: Path | None = None  # CA bundle the server's certificate must chain to
    tls_cert: Path | None = None  # client certificate (mutual TLS)
    tls_key: Path | None = None
    tls_hostname: str | None = None  # name the server's certificate must carry
    inbox_prefix: str | None = None

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("--nats-user and --nats-password go together")
        given = [
            name
            for name, v in (
                ("user/password", self.user),
                ("token", self.token),
                ("NKey seed", self.nkey_seed),
                ("creds file", self.creds),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one kind of NATS credentials, not {' and '.join(given)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        for path in (self.nkey_seed, self.creds, self.tls_ca, self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"{path}: no such file")
        if self.inbox_prefix is not None and (
            not self.inbox_prefix or any(c in self.inbox_prefix for c in " *>\t\r\n.")
        ):
            raise ValueError(f"--nats-inbox-prefix {self.inbox_prefix!r}: one subject token")

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(self.tls_ca) if self.tls_ca is not None else None
        )
        if self.tls_cert is not None and self.tls_key is not None:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return ctx

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (the secrets included: do not log this)."""
        kw: dict[str, Any] = {}
        if self.user is not None:
            kw.update(user=self.user, password=self.password)
        if self.token is not None:
            kw["token"] = self.token
        if self.nkey_seed is not None:
            kw["nkeys_seed"] = str(self.nkey_seed)
        if self.creds is not None:
            kw["user_credentials"] = str(self.creds)
        if self.tls:
            kw["tls"] = self.ssl_context()
            if self.tls_hostname is not None:
                kw["tls_hostname"] = self.tls_hostname
        if self.inbox_prefix is not None:
            kw["inbox_prefix"] = self.inbox_prefix
        return kw

    def environ(self) -> dict[str, str]:
        """These options as the WORKER_ORCD_NATS_<NAME> variables `nats_connect_options`
        reads: how a tool hands them to the processes it starts (secrets stay off their
        command lines)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[ENV_PREFIX + f.name.upper()] = str(value)
        return out

    def describe(self) -> str:
        """For logs: which kinds of credentials and TLS are in use, never a secret."""
        parts = []
        if self.user is not None:
            parts.append(f"user {self.user}")
        if self.token is not None:
            parts.append("token")
        if self.nkey_seed is not None:
            parts.append("NKey")
        if self.creds is not None:
            parts.append(f"creds {self.creds.name}")
        if self.tls:
            parts.append("TLS" + (" with client certificate" if self.tls_cert else ""))
        return ", ".join(parts) or "no credentials"


def split_servers(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` -> both URLs (the nodes of a cluster)."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError(f"no NATS server URL in {url!r}")
    return servers


def add_nats_connect_arguments(p: argparse.ArgumentParser) -> None:
    """The credential, TLS and inbox flags (defaults None: the environment applies)."""
    g = p.add_argument_group(
        "NATS credentials and TLS",
        "each also from WORKER_ORCD_NATS_<NAME> (e.g. WORKER_ORCD_NATS_PASSWORD): put secrets "
        "there or in files, not on the command line",
    )
    g.add_argument("--nats-user", help="user name (with --nats-password)")
    g.add_argument("--nats-password", help="password (better: WORKER_ORCD_NATS_PASSWORD)")
    g.add_argument("--nats-token", help="authentication token (better: WORKER_ORCD_NATS_TOKEN)")
    g.add_argument("--nats-nkey-seed", type=Path, help="file holding the user's NKey seed")
    g.add_argument("--nats-creds", type=Path, help=".creds file (user JWT and NKey seed)")
    g.add_argument("--nats-tls-ca", type=Path, help="CA bundle to verify the server with")
    g.add_argument("--nats-tls-cert", type=Path, help="client certificate (mutual TLS)")
    g.add_argument("--nats-tls-key", type=Path, help="client certificate's private key")
    g.add_argument("--nats-tls-hostname", help="server name its certificate must carry")
    g.add_argument(
        "--nats-inbox-prefix",
        help="inbox prefix for replies (default _INBOX), so permissions can be per user",
    )


def connect_flags_given(args: argparse.Namespace) -> list[str]:
    """The credential/TLS flags set on the command line (not from the environment)."""
    return [
        "--nats-" + f.name.replace("_", "-")
        for f in fields(NatsConnectOptions)
        if getattr(args, f"nats_{f.name}", None) is not None
    ]


def url_connect_options(args: argparse.Namespace) -> NatsConnectOptions | None:
    """For a tool that starts its own nats-server unless given --nats-url (bench --suite,
    gateway-bench): the options for --nats-url, None for its own server (which asks for no
    credentials). ValueError for a credential flag without --nats-url or a setting that
    cannot be used."""
    if args.nats_url is None:
        given = connect_flags_given(args)
        if given:
            raise ValueError(f"{' '.join(given)}: only with --nats-url")
        return None
    return nats_connect_options(args)


def nats_connect_options(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> NatsConnectOptions:
    """The options from flags (see `add_nats_connect_arguments`), else the environment.
    Raises ValueError with the flag's name for an inconsistent or missing-file setting."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(NatsConnectOptions):
        value = getattr(args, f"nats_{f.name}", None)
        if value is None:
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw:
                value = Path(raw) if "Path" in str(f.type) else raw
        if value is not None:
            values[f.name] = value
    return NatsConnectOptions(**values)

"""Security on a real nats-server: accounts and least-privilege users (worker/nats/permissions.py),
user/password, NKey and token credentials, mutual TLS with a CA made here; the payload size
limit; prompts and outputs kept out of the worker's logs unless --log-prompts."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.options import NatsConnectOptions
from worker.nats.permissions import (
    CLIENT_INBOX,
    WORKER_INBOX,
    client_permissions,
    render,
    worker_permissions,
)
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import MAX_JOB_PAYLOAD_BYTES, End, Error, Token

REF = "tiny"


def violations(srv: EmbeddedNatsServer, user: str | None = None) -> list[str]:
    """The server's permission-violation log lines (of `user`, or of anyone)."""
    text = srv.log_path.read_text() if srv.log_path.exists() else ""
    who = "" if user is None else f'/user:{user}"'
    return [ln for ln in text.splitlines() if " Violation - " in ln and who in ln]


async def refused(url: str, opts: NatsConnectOptions, worker_id: str | None = None) -> None:
    """A client with `opts` gets nowhere: no connection within 3 s (nats-py retries a refused
    first connection while reconnects are unlimited), or no answer from a worker."""

    async def attempt() -> None:
        c = await OrcdClient.connect(url, connect_timeout_s=1.0, options=opts)
        try:
            if worker_id is not None:
                await c.health(worker_id, timeout_s=1.0)
        finally:
            await c.close()

    with pytest.raises((TimeoutError, OSError, nats.errors.Error)):
        await asyncio.wait_for(attempt(), 3.0)


def nkey_user(tmp: Path) -> tuple[str, Path]:
    """A new NKey user: (public key for the server's config, seed file for the worker)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = tmp / "worker.nk"
    path.write_bytes(seed)
    path.chmod(0o600)
    return public, path


@pytest.fixture
def accounts_server(tmp_path: Path) -> Any:
    """Account ORCD: a worker user and an NKey worker with worker_permissions(), a client
    user with client_permissions(). Account OTHER: a user with no restrictions there."""
    public, seed_file = nkey_user(tmp_path)
    w, c = render(worker_permissions()), render(client_permissions())
    config = f"""
accounts {{
  ORCD {{
    jetstream: enabled
    users: [
      {{user: worker, password: "w-secret", permissions: {w}}}
      {{nkey: {public}, permissions: {w}}}
      {{user: client, password: "c-secret", permissions: {c}}}
    ]
  }}
  OTHER {{
    jetstream: enabled
    users: [ {{user: other, password: "o-secret"}} ]
  }}
}}
"""
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats", config=config)
    srv.start()
    try:
        yield srv, seed_file
    finally:
        srv.stop()


async def test_least_privilege_worker_and_client_users(
    accounts_server: Any, spawn_worker: Any, tiny_model: Path, gather: Any
) -> None:
    srv, seed_file = accounts_server
    # the password through the environment, not the command line
    w = spawn_worker(
        tiny_model,
        srv.url,
        REF,
        *("--ctx-size", "512", "--nats-user", "worker", "--nats-inbox-prefix", WORKER_INBOX),
        env={"WORKER_ORCD_NATS_PASSWORD": "w-secret"},
    ).wait_ready()
    w2 = spawn_worker(
        tiny_model,
        srv.url,
        REF,
        *("--ctx-size", "512", "--nats-nkey-seed", str(seed_file)),
        *("--nats-inbox-prefix", WORKER_INBOX),
    ).wait_ready()
    client = await OrcdClient.connect(
        srv.url,
        options=NatsConnectOptions(user="client", password="c-secret", inbox_prefix=CLIENT_INBOX),
    )
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    other = await nats.connect(srv.url, user="other", password="o-secret", error_cb=on_error)
    seen_by_other: list[str] = []

    async def on_other(msg: Msg) -> None:
        seen_by_other.append(msg.subject)

    await other.subscribe(">", cb=on_other)
    await other.flush()
    try:
        # the client does everything a client does
        for k in range(4):  # both workers (user/password, NKey) take jobs
            evs = await gather(
                client.generate(REF, prompt=f"hello {k}", max_tokens=3, timeout_s=60)
            )
            assert isinstance(evs[-1], End), evs[-1]
        stored = await client.replay(evs[0].job_id)
        assert [type(e) for e in stored] == [type(e) for e in evs]
        assert (await client.health(w.worker_id)).status == "healthy"
        assert (await client.health(w2.worker_id)).status == "healthy"
        replies = await client.cancel("never-ran")
        assert {r.status for r in replies} == {"recorded"}
        # ... and nothing else: no shutdown, no forged events, no reading of the queue
        with pytest.raises(Exception):  # noqa: B017 - permission error or timeout
            await client.shutdown(w.worker_id, timeout_s=1.0)
        read_jobs: list[bytes] = []

        async def on_job(msg: Msg) -> None:
            read_jobs.append(msg.data)

        await client.nc.subscribe("orcd.jobs.>", cb=on_job)
        await client.nc.publish("orcd.events.forged", b'{"event":"end"}')
        await client.nc.flush()
        evs = await gather(client.generate(REF, prompt="secret prompt", max_tokens=2))
        assert isinstance(evs[-1], End)
        await asyncio.sleep(0.5)
        assert not read_jobs
        assert w.proc.poll() is None and w2.proc.poll() is None
        assert (await client.health(w.worker_id)).status == "healthy"
        v = violations(srv, "client")
        assert any("orcd.control." in ln for ln in v), v
        assert any("orcd.jobs.>" in ln for ln in v) and any("orcd.events.forged" in ln for ln in v)
        # the other account sees none of it, and reaches no worker
        assert not seen_by_other, seen_by_other[:5]
        with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
            await other.request("orcd.health", b"", timeout=1)
        # the workers needed nothing beyond their permissions (the NKey one included)
        assert violations(srv) == violations(srv, "client")
        assert not w.events("nats_error") and not w2.events("nats_error")
        # a wrong password is refused
        await refused(srv.url, NatsConnectOptions(user="client", password="wrong"))
        assert 'authentication error - User "client"' in srv.log_path.read_text()
    finally:
        await client.close()
        await other.close()


# ----------------------------------------------------------------------------- TLS


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("orcd test CA"))
        .issuer_name(_name("orcd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out: dict[str, Path] = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, usage in (("server", x509.OID_SERVER_AUTH), ("client", x509.OID_CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"orcd test {who}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if who == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[f"{who}_cert"] = tmp / f"{who}.pem"
        out[f"{who}_key"] = tmp / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


async def test_mutual_tls_and_token(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path, gather: Any
) -> None:
    pki = make_pki(tmp_path)
    config = f"""
tls {{
  cert_file: "{pki["server_cert"]}"
  key_file: "{pki["server_key"]}"
  ca_file: "{pki["ca"]}"
  verify: true
}}
authorization {{ token: "t-secret" }}
"""
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats", config=config)
    srv.start()
    tls = {
        "tls_ca": pki["ca"],
        "tls_cert": pki["client_cert"],
        "tls_key": pki["client_key"],
    }
    try:
        w = spawn_worker(
            tiny_model,
            srv.url,
            REF,
            *("--ctx-size", "512", "--nats-tls-ca", str(pki["ca"])),
            *("--nats-tls-cert", str(pki["client_cert"]), "--nats-tls-key", str(pki["client_key"])),
            env={"WORKER_ORCD_NATS_TOKEN": "t-secret"},
        ).wait_ready()
        assert "token, TLS with client certificate" in w.wait_event("nats_connected")["msg"]
        client = await OrcdClient.connect(
            srv.url, options=NatsConnectOptions(token="t-secret", **tls)
        )
        try:
            evs = await gather(client.generate(REF, prompt="over TLS", max_tokens=3, timeout_s=60))
            assert isinstance(evs[-1], End)
            assert (await client.health(w.worker_id)).status == "healthy"
        finally:
            await client.close()
        # refused: no client certificate; no token; no TLS at all
        for opts in (
            NatsConnectOptions(token="t-secret", tls_ca=pki["ca"]),
            NatsConnectOptions(**tls),
            NatsConnectOptions(token="t-secret"),
        ):
            await refused(srv.url, opts, w.worker_id)
    finally:
        srv.cleanup()


# ----------------------------------------------------------------------------- .creds (JWT)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _pub(kp: nkeys.KeyPair) -> str:
    return str(kp.public_key.decode())


def _jwt(signer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (v2): ed25519-nkey signed claims; jti = base32(sha512/256(claims))."""
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": _pub(signer),
        "name": name,
        "sub": subject,
        "nats": nats_claims,
    }
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode())
    claims["jti"] = base64.b32encode(digest.digest()).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


_UNLIMITED = {
    **{k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")},
    **{k: -1 for k in ("mem_storage", "disk_storage", "streams", "consumer")},
    "wildcards": True,
}


def _creds_file(path: Path, account: nkeys.KeyPair, name: str, perms: dict[str, Any]) -> Path:
    """A user of `account` with `perms` (permissions.py's form) as a .creds file."""
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    claims: dict[str, Any] = {"type": "user", "version": 2, "subs": -1, "data": -1}
    claims |= {"payload": -1, "pub": perms["publish"], "sub": perms["subscribe"]}
    if perms.get("allow_responses"):
        claims["resp"] = {"max": 1, "ttl": 0}
    token = _jwt(account, _pub(user), name, claims)
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


def operator_mode(tmp: Path) -> tuple[str, Path, Path]:
    """A server configuration in operator (JWT) mode with account ORCD, and .creds files of
    a worker and a client user with the least-privilege permissions."""
    op = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    acc, sys_acc = _keypair(nkeys.PREFIX_BYTE_ACCOUNT), _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    no_js = {**_UNLIMITED, "mem_storage": 0, "disk_storage": 0, "streams": 0, "consumer": 0}
    config = (
        f"operator: {_jwt(op, _pub(op), 'op', {'type': 'operator', 'version': 2})}\n"
        f"system_account: {_pub(sys_acc)}\nresolver: MEMORY\nresolver_preload: {{\n"
        f"  {_pub(acc)}: "
        f"{_jwt(op, _pub(acc), 'ORCD', {'type': 'account', 'version': 2, 'limits': _UNLIMITED})}\n"
        f"  {_pub(sys_acc)}: "
        f"{_jwt(op, _pub(sys_acc), 'SYS', {'type': 'account', 'version': 2, 'limits': no_js})}\n"
        "}\n"
    )
    worker = _creds_file(tmp / "worker.creds", acc, "worker", worker_permissions())
    client = _creds_file(tmp / "client.creds", acc, "client", client_permissions())
    return config, worker, client


async def test_creds_files_in_operator_mode(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path, gather: Any
) -> None:
    """A server in operator (JWT) mode: a worker and a client, each with a .creds file whose
    user JWT carries the least-privilege permissions, serve a job; the client still cannot
    shut the worker down."""
    config, worker_creds, client_creds = operator_mode(tmp_path)
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats", config=config)
    srv.start()
    try:
        w = spawn_worker(
            tiny_model,
            srv.url,
            REF,
            *("--ctx-size", "512", "--nats-inbox-prefix", WORKER_INBOX),
            env={"WORKER_ORCD_NATS_CREDS": str(worker_creds)},
        ).wait_ready()
        assert "creds worker.creds" in w.wait_event("nats_connected")["msg"]
        client = await OrcdClient.connect(
            srv.url, options=NatsConnectOptions(creds=client_creds, inbox_prefix=CLIENT_INBOX)
        )
        try:
            evs = await gather(client.generate(REF, prompt="jwt", max_tokens=3, timeout_s=60))
            assert isinstance(evs[-1], End)
            assert (await client.health(w.worker_id)).status == "healthy"
            with pytest.raises(Exception):  # noqa: B017 - permission error or timeout
                await client.shutdown(w.worker_id, timeout_s=1.0)
            assert w.proc.poll() is None
        finally:
            await client.close()
        assert violations(srv) and all("orcd.control." in ln for ln in violations(srv))
        # a .creds file signed by another operator's account is refused
        (tmp_path / "other").mkdir()
        _, _, stranger = operator_mode(tmp_path / "other")
        await refused(srv.url, NatsConnectOptions(creds=stranger))
    finally:
        srv.cleanup()


# ----------------------------------------------------------------------------- payloads


async def test_payload_size_limit(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path, gather: Any
) -> None:
    """Over MAX_JOB_PAYLOAD_BYTES: refused at publish by the ORCD_JOBS the worker creates; on a
    stream created elsewhere without that limit, the worker refuses it unread with an
    INVALID_REQUEST event on the job's subject (it never decodes or tokenizes it)."""
    big = json.dumps({"job_id": "big-1", "prompt": "x" * (MAX_JOB_PAYLOAD_BYTES + 10)}).encode()
    for own_stream in (False, True):
        srv = EmbeddedNatsServer(store_dir=tmp_path / f"nats-{own_stream}")
        srv.start()
        client = await OrcdClient.connect(srv.url)
        try:
            if own_stream:  # an operator's stream, without a message size limit
                await client.js.add_stream(
                    StreamConfig(
                        name="ORCD_JOBS",
                        subjects=["orcd.jobs.>"],
                        retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE,
                    )
                )
            w = spawn_worker(tiny_model, srv.url, REF, "--ctx-size", "512").wait_ready()
            if not own_stream:
                with pytest.raises(nats.js.errors.APIError, match=r"(?i)maximum"):
                    await client.js.publish("orcd.jobs.tiny", big)
                continue
            evs = await gather(client.run_job(REF, big, job_id="big-1", timeout_s=60))
            assert len(evs) == 1 and isinstance(evs[0], Error)
            assert evs[0].code is ErrorCode.INVALID_REQUEST
            assert f"at most {MAX_JOB_PAYLOAD_BYTES} allowed" in evs[0].message
            assert not w.events("execute_start")
            evs = await gather(client.generate(REF, prompt="small", max_tokens=2, timeout_s=60))
            assert isinstance(evs[-1], End)
        finally:
            await client.close()
            srv.cleanup()


# ----------------------------------------------------------------------------- logs

MARKER = "zqxj-marker-7f3a9c"


def log_values(records: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for rec in records:
        for value in rec.values():
            out.append(value if isinstance(value, str) else json.dumps(value))
    return out


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_and_outputs_stay_out_of_logs(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
    log_prompts: bool,
) -> None:
    flags = ("--ctx-size", "512", *(["--log-prompts"] if log_prompts else []))
    w = spawn_worker(tiny_model, nats_server.url, REF, *flags).wait_ready()
    outputs = []
    for kw in (
        {"prompt": f"tell me about {MARKER}"},
        {"messages": [{"role": "user", "content": f"chat about {MARKER}"}]},
    ):
        evs = await gather(
            client.generate(REF, max_tokens=12, temperature=0.0, seed=3, timeout_s=60, **kw)
        )
        assert isinstance(evs[-1], End)
        outputs.append("".join(e.t for e in evs if isinstance(e, Token)))
    # an invalid job, a job cut by the context, a raw unparseable one: the marker is in each
    for job_id, raw in (
        ("bad-1", json.dumps({"job_id": "bad-1", "prompt": MARKER, "max_tokens": 0}).encode()),
        ("long-1", json.dumps({"job_id": "long-1", "prompt": (MARKER + " ") * 400}).encode()),
        ("raw-1", b'{"job_id": "raw-1", "prompt": "' + MARKER.encode() + b'\xff", "x": NaN}'),
    ):
        evs = await gather(client.run_job(REF, raw, job_id=job_id, timeout_s=60))
        assert isinstance(evs[-1], Error)
    w.stop()
    text = w.output()
    values = log_values(w.records)
    output = max(outputs, key=len)
    assert len(output) >= 8, outputs
    if log_prompts:
        assert MARKER in text and any(output in v for v in values)
    else:
        assert MARKER not in text, [ln for ln in text.splitlines() if MARKER in ln][:3]
        assert not any(o in v for v in values for o in outputs if len(o) >= 8)
        # what is logged instead: the SHA-256 and length
        start = w.events("execute_start")[0]
        assert len(start["prompt_sha256"]) == 64 and "prompt" not in start

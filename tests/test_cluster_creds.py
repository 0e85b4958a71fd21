"""Issue 14: a worker joining over the internet with a NATS ``.creds`` file. A real nats-server
on loopback in decentralised JWT mode (an operator, a system account and an account with
JetStream, preloaded into a memory resolver), the keys and JWTs made here with ``nkeys``:
``[cluster] credentials`` lets the bot and a worker process in and a job goes through end to
end; with no credentials, another operator's ``.creds`` or an expired one, the server refuses
them and doctor and the worker say so in a sentence that shows neither the JWT nor the seed.
When the bot's JWT expires while connected, it connects again once a new file is in place."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the cluster needs nats-py (the test extra)")
nkeys = pytest.importorskip("nkeys", reason="nats-py reads .creds files with nkeys (the test "
                            "extra)")

from bot.doctor import run_doctor  # noqa: E402
from engine.cluster.names import CredentialsError, check_credentials, connect  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.job import JobStatus  # noqa: E402
from tests import test_cluster  # noqa: E402
from tests.cluster_fixtures import (  # noqa: E402
    ROOT,
    cluster_config,
    eventually,
    free_port,
    start_configured_server,
    worker_config_file,
)
from tests.conftest import make_request  # noqa: E402
from tests.test_cluster import ORIGIN, local_png, open_bot, user  # noqa: E402

# the cluster tests' fixtures: worker processes and bot engines, closed at the test's end
workers, bots = test_cluster.workers, test_cluster.bots

UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
             "wildcards": True, "conn": -1, "leaf": -1}
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


# -- NATS JWTs (github.com/nats-io/jwt v2): header.claims.signature, base64url, no padding ------
def _key(prefix: int):  # noqa: ANN202 - an nkeys.KeyPair
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer, subject, name: str, nats: dict, expires: int = 0) -> str:  # noqa: ANN001
    """``subject``'s claims signed by ``issuer`` (the operator signs itself and the accounts,
    an account its users). jti: the claims' SHA-512/256 in base32, as nats-io/jwt makes it."""
    claims: dict = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name,
                    "sub": subject.public_key.decode()}
    if expires:
        claims["exp"] = expires
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    claims["nats"] = {**nats, "version": 2}
    signed = (_b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()) + "."
              + _b64(json.dumps(claims).encode()))
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


@dataclass
class Creds:
    path: Path
    jwt: str
    seed: str


class Operator:
    """An operator with a system account and one account with JetStream (``bots``)."""

    def __init__(self) -> None:
        self.key = _key(nkeys.PREFIX_BYTE_OPERATOR)
        self.system = _key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = _key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.jwt = _jwt(self.key, self.key, "imagine", {
            "type": "operator", "system_account": self.public(self.system)})
        self.accounts = {
            self.public(self.system): _jwt(self.key, self.system, "SYS",
                                           {"type": "account", "limits": UNLIMITED}),
            self.public(self.account): _jwt(self.key, self.account, "bots", {
                "type": "account", "limits": {**UNLIMITED, **JETSTREAM}}),
        }

    @staticmethod
    def public(key) -> str:  # noqa: ANN001
        return key.public_key.decode()

    def user(self, path: Path, *, expires: int = 0, account=None, seed_of=None) -> Creds:  # noqa: ANN001
        """A ``.creds`` file as ``nsc`` writes it: the user's JWT, then its seed. ``account``:
        another account key signs the user; ``seed_of``: the seed of another key than the
        JWT's user."""
        key = _key(nkeys.PREFIX_BYTE_USER)
        token = _jwt(account or self.account, key, path.stem, {
            "type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
            expires)
        seed = (seed_of or key).seed.decode()
        path.write_text(f"""-----BEGIN NATS USER JWT-----
{token}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
""")
        return Creds(path, token, seed)


class JwtServer:
    """``nats-server -c server.conf``: the operator's JWT trusted, its accounts preloaded into a
    memory resolver, JetStream on ``folder``."""

    def __init__(self, folder: Path, operator: Operator) -> None:
        self.port = free_port()
        (folder / "operator.jwt").write_text(operator.jwt)
        preload = "\n".join(f'  {account}: "{token}"'
                            for account, token in operator.accounts.items())
        self.process, self.log = start_configured_server(folder, self.port, f"""
operator: "{folder / 'operator.jwt'}"
system_account: "{operator.public(operator.system)}"
resolver: MEMORY
resolver_preload: {{
{preload}
}}
""")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def operator() -> Operator:
    return Operator()


@pytest.fixture
def jwt_server(tmp_path: Path, operator: Operator) -> Iterator[JwtServer]:
    server = JwtServer(tmp_path, operator)
    yield server
    server.stop()


@pytest.fixture
def creds(tmp_path: Path, operator: Operator) -> Creds:
    return operator.user(tmp_path / "worker.creds")


@pytest.fixture
def cfg(tmp_path: Path, jwt_server: JwtServer, creds: Creds) -> Config:
    """The bot's config (and, through ``workers``, the workers'), with the ``.creds`` file."""
    cfg = cluster_config(tmp_path, jwt_server.url)
    cfg.cluster.credentials = str(creds.path)
    return cfg


def _doctor(cfg: Config, credentials: Path | str) -> tuple[int, str]:
    cfg.cluster.credentials = str(credentials)
    lines: list[str] = []
    code = run_doctor(cfg, None, print_fn=lines.append)
    return code, "\n".join(lines)


def _no_secret(text: str, *creds: Creds) -> None:
    for each in creds:
        assert each.seed not in text and each.jwt not in text, text
        assert each.jwt.split(".")[1] not in text, text  # nor the JWT's claims alone


async def test_the_bot_and_a_worker_with_credentials_run_a_job(cfg, creds, workers, bots
                                                               ) -> None:
    workers.start("w1", f'credentials = "{creds.path}"')
    engine = await open_bot(cfg, bots, workers=1)
    job = await engine.submit(user(1), make_request("a fox", seed=3), ORIGIN)
    assert await asyncio.wait_for(job.wait(), 20) is JobStatus.FINISHED, job.error
    assert (await job.result()).png == local_png(job.request)
    await eventually(lambda: workers.finished("w1") == [job.id], what="the worker's log")
    code, shown = await asyncio.to_thread(_doctor, cfg, creds.path)
    assert f"[ok ] cluster: NATS server {cfg.cluster.url} reachable, JetStream on" in shown
    assert "[ok ] workers: 1 online" in shown, shown
    _no_secret(shown + workers.log("w1"), creds)


@pytest.mark.parametrize("which", ["none", "another operator's", "an unknown account's",
                                   "another key's seed"])
def test_the_server_refuses_a_client_without_its_credentials(tmp_path, cfg, creds, operator,
                                                             which) -> None:
    """The server answers; doctor says it would not have this client, and what to set."""
    given: Creds | None = None
    if which == "another operator's":
        given = Operator().user(tmp_path / "other.creds")
    elif which == "an unknown account's":  # the server's operator, an account it was not given
        given = operator.user(tmp_path / "stranger.creds",
                              account=_key(nkeys.PREFIX_BYTE_ACCOUNT))
    elif which == "another key's seed":  # a good JWT, but the nonce signed by another key
        given = operator.user(tmp_path / "mixed.creds", seed_of=_key(nkeys.PREFIX_BYTE_USER))
    started = time.monotonic()
    code, shown = _doctor(cfg, given.path if given else "")
    assert code == 1 and time.monotonic() - started < 5
    assert (f"[FAIL] cluster: NATS server {cfg.cluster.url}: the server refused this client "
            "(Authorization Violation): set [cluster] credentials to a .creds file of a user "
            "the server trusts") in shown, shown
    assert "not reachable" not in shown and "start it" not in shown, shown  # it is there
    _no_secret(shown, creds, *([given] if given else []))


def test_an_expired_creds_file_is_named_and_the_server_refuses_it(tmp_path, cfg, operator
                                                                  ) -> None:
    """The server's own operator and account, only the date is past: the server says no more
    than 'Authorization Violation', so connect() reads the JWT's expiry itself and says it."""
    import nats

    old = operator.user(tmp_path / "old.creds", expires=int(time.time()) - 3600)
    code, shown = _doctor(cfg, old.path)
    assert code == 1
    assert (f"[FAIL] cluster: [cluster] credentials {old.path}: its user JWT expired on "
            in shown), shown
    assert "UTC; ask the NATS server's admin for a new .creds file" in shown, shown
    _no_secret(shown, old)

    async def straight_to_the_server() -> None:  # nats-py alone: the server's own answer
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(cfg.cluster.url, user_credentials=str(old.path),
                               allow_reconnect=False, max_reconnect_attempts=0)

    asyncio.run(straight_to_the_server())


def test_a_worker_with_an_expired_creds_file_stops_with_one_sentence(tmp_path, cfg, operator
                                                                     ) -> None:
    """Retrying cannot help, so the worker does not: it exits 1 with the reason."""
    old = operator.user(tmp_path / "old.creds", expires=int(time.time()) - 60)
    config = worker_config_file(cfg, tmp_path / "w1.toml", "w1", f'credentials = "{old.path}"')
    done = subprocess.run([sys.executable, "-m", "bot", "worker", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert f"worker stopped: [cluster] credentials {old.path}: its user JWT expired on " in said
    assert "Traceback" not in said, said
    _no_secret(said, old)


async def test_the_bot_does_not_start_with_an_expired_creds_file(tmp_path, cfg, operator,
                                                                 bots) -> None:
    old = operator.user(tmp_path / "old.creds", expires=int(time.time()) - 60)
    cfg.cluster.credentials = str(old.path)
    with pytest.raises(CredentialsError, match="its user JWT expired on") as caught:
        await asyncio.wait_for(open_bot(cfg, bots, workers=0), 10)
    _no_secret(str(caught.value), old)


async def test_a_refused_worker_keeps_trying_and_logs_why(tmp_path, cfg, caplog) -> None:
    """Refused credentials may be fixed on the server (the account added): the bot's and the
    workers' connection tries again, and each try's log line says why it was refused."""
    from engine.cluster import names

    other = Operator().user(tmp_path / "other.creds")
    cfg.cluster.credentials = str(other.path)
    with caplog.at_level("WARNING", logger=names.__name__):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(connect(cfg.cluster, "worker"), 1)
    said = [r.getMessage() for r in caplog.records if r.name == names.__name__]
    assert any("the server refused this client (Authorization Violation): set [cluster] "
               "credentials" in line for line in said), said
    _no_secret("\n".join(said), other)


def test_a_worker_whose_credentials_expire_while_connected_stops_and_says_why(
        tmp_path, cfg, operator, workers) -> None:
    """The server ends the session when the user's JWT expires, and nats-py does not
    reconnect after that: the worker must not sit there unheard of; it exits 1 and says why."""
    soon = operator.user(tmp_path / "soon.creds", expires=int(time.time()) + 5)  # in by then
    workers.start("w1", f'credentials = "{soon.path}"')
    process = workers.processes["w1"]
    assert process.wait(20) == 1, workers.log("w1")
    said = workers.log("w1")
    assert "worker w1 ready" in said, said  # it was in before the JWT expired
    assert ("NATS: the connection is closed for good: the server ended this client's session: "
            "its credentials expired; put a new .creds file at [cluster] credentials") in said
    assert ("worker stopped: the NATS server closed this worker's connection for good: the "
            "server ended this client's session: its credentials expired") in said, said
    assert "reconnecting" not in said, said  # nats-py does not, so neither does the log
    _no_secret(said, soon)


@pytest.mark.parametrize(("content", "why"), [
    (None, "cannot be read (No such file or directory)"),
    ("nats://127.0.0.1:4222\n", "is not a NATS .creds file"),
    # nats-py would read a file with a seed and no JWT for ever (it never finds the JWT)
    ("-----BEGIN USER NKEY SEED-----\nSUAXXXX\n------END USER NKEY SEED------\n",
     "is not a NATS .creds file"),
])
def test_a_file_that_is_not_a_creds_file_is_named(tmp_path, cfg, content, why) -> None:
    path = tmp_path / "worker.creds.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialsError, match=re.escape(why)):
        check_credentials(str(path))
    started = time.monotonic()
    code, shown = _doctor(cfg, path)
    assert code == 1 and time.monotonic() - started < 5
    assert f"[FAIL] cluster: [cluster] credentials {path} {why}" in shown, shown


async def test_a_reason_repeated_twice_a_second_is_logged_once_a_minute(caplog, monkeypatch
                                                                        ) -> None:
    """A refusing (or absent) server is retried twice a second: the log says so once a minute,
    with the count of repeats it left out, and a new reason at once."""
    from engine.cluster import names

    clock = [1000.0]
    monkeypatch.setattr(names.time, "monotonic", lambda: clock[0])
    errors = names.QuietErrors(every_s=60).log
    refused = Exception("nats: 'Authorization Violation'")
    with caplog.at_level("WARNING", logger=names.log.name):
        for _ in range(120):  # a minute of retries
            await errors(refused)
            clock[0] += 0.5
        await errors(ConnectionRefusedError("Connect call failed"))  # a new reason: at once
        await errors(refused)  # a minute after the first: logged, with the count
        await errors(refused)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "refused this client" in lines[0] and "more times" not in lines[0]
    assert "Connect call failed" in lines[1]
    assert "refused this client" in lines[2]
    assert "also 119 more times in the last 60 s" in lines[2]


async def _closed_for_good(caplog) -> None:  # noqa: ANN001
    await eventually(lambda: "the connection is closed for good" in caplog.text, timeout=10,
                     what="the server closing the bot's connection")


async def test_the_bot_connects_again_when_a_new_creds_file_replaces_an_expired_one(
        tmp_path, cfg, creds, operator, workers, bots, caplog) -> None:
    """The server ends the bot's session when its JWT expires and nats-py does not reconnect:
    the bot keeps serving its chats and tries again every few seconds, reading the file again,
    so the admin's new file is taken without a restart. A job sent while it was away waits and
    goes through, and so does one sent after."""
    from engine.cluster import dispatch

    workers.start("w1", f'credentials = "{creds.path}"')  # its file does not expire
    await eventually(lambda: "worker w1 ready" in workers.log("w1"), what="the worker")
    path = tmp_path / "bot.creds"
    soon = operator.user(path, expires=int(time.time()) + 3)
    cfg.cluster.credentials = str(path)
    caplog.set_level("INFO")
    engine = await open_bot(cfg, bots, workers=1)
    await _closed_for_good(caplog)
    away = await engine.submit(user(1), make_request("a fox", seed=3), ORIGIN)
    await eventually(lambda: f"credentials {path}: its user JWT expired on" in caplog.text,
                     timeout=2 * dispatch.RECONNECT_S + 1, what="a try with the same file")
    fresh = operator.user(path)  # the admin's new file, in the same place
    await eventually(lambda: "NATS: connected again" in caplog.text,
                     timeout=2 * dispatch.RECONNECT_S + 1, what="the bot connecting again")
    after = await engine.submit(user(2), make_request("a cat", seed=4), ORIGIN)
    for job in (away, after):
        assert await asyncio.wait_for(job.wait(), 10) is JobStatus.FINISHED, job.error
        assert (await job.result()).png == local_png(job.request)
    assert ("NATS: the connection is closed for good: the server ended this client's session: "
            "its credentials expired") in caplog.text
    assert "Traceback" not in caplog.text, caplog.text
    _no_secret(caplog.text + workers.log("w1"), soon, fresh, creds)


async def test_the_bot_closes_while_it_connects_again(tmp_path, cfg, operator, bots,
                                                      caplog) -> None:
    """A shutdown while the bot tries again, here with a file the server refuses (nats-py
    retries inside ``connect``): it stops at once, its tasks and the connection with it."""
    path = tmp_path / "bot.creds"
    operator.user(path, expires=int(time.time()) + 2)
    cfg.cluster.credentials = str(path)
    engine = await open_bot(cfg, bots, workers=0)
    await _closed_for_good(caplog)
    Operator().user(path)  # not expired, but another operator's: refused, retried for ever
    await eventually(lambda: "refused this client" in caplog.text, timeout=5,
                     what="a refused try")
    started = time.monotonic()
    await asyncio.wait_for(engine.shutdown(grace_s=1), 5)
    assert time.monotonic() - started < 3
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("cluster-")]
    assert left == [], left

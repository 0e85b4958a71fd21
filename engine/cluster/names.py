"""The server-side names of one cluster (``[cluster] name``), and how to connect to it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import logging
import math
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cluster.messages import WorkerInfo
from engine.config import ClusterSection

if TYPE_CHECKING:  # pragma: no cover
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

log = logging.getLogger(__name__)
# A job published again within this window (the bot restarted while a worker held it) is
# dropped by the server as a duplicate of the first.
DEDUP_WINDOW_S = 3600.0
# A worker's consumer that nobody pulled from for this long (a worker gone for good, such as
# a host-pid name) is deleted by the server; far longer than any one job.
CONSUMER_IDLE_S = 86400.0


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def jobs_stream(self) -> str:
        return f"{self.prefix.upper()}_JOBS"

    @property
    def results_stream(self) -> str:
        return f"{self.prefix.upper()}_RESULTS"

    @property
    def dead_stream(self) -> str:
        return f"{self.prefix.upper()}_DEAD"

    @property
    def jobs(self) -> str:
        """Every worker's jobs (the stream's subjects)."""
        return f"{self.prefix}.jobs.*"

    def jobs_for(self, worker: str) -> str:
        """One worker's jobs: the bot names the worker when it hands a job out."""
        return f"{self.prefix}.jobs.{worker}"

    @staticmethod
    def consumer(worker: str) -> str:
        return f"worker-{worker}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}.results.{job_id}"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}.progress.{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}.cancel.{job_id}"

    @property
    def dead_letters(self) -> str:
        """The server's advisory for a job that reached ``max_deliver`` (any worker's)."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.jobs_stream}.*"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}-workers"

    @property
    def images_bucket(self) -> str:
        return f"{self.prefix}-images"

    @staticmethod
    def image(job_id: str, index: int) -> str:
        return f"{job_id}.{index}"

    @staticmethod
    def input_image(job_id: str) -> str:
        return f"{job_id}.input"


async def connect(settings: ClusterSection, client_name: str, *,
                  once_within_s: float | None = None) -> Client:
    """A connection that reconnects for ever (a NATS restart is a pause, not an end); with
    ``once_within_s`` (``doctor``) one try of that long, and an error if the server is away.
    The server can still close it for good (the credentials expired while connected: nats-py
    does not reconnect then); the log says why, and ``is_closed`` tells the caller."""
    from nats.aio.client import Client

    client = Client()
    stopped = False  # the caller stopped connecting: closing that client is no news

    async def disconnected() -> None:
        if not client.is_closed:  # closed for good: closed() says why
            log.warning("NATS: disconnected; reconnecting")

    async def closed() -> None:
        if client.last_error is not None and not stopped:  # the server ended it
            log.error("NATS: the connection is closed for good: %s", explain(client.last_error))

    options: dict[str, Any] = {
        "servers": [settings.url], "name": client_name, "allow_reconnect": True,
        "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "connect_timeout": 5,
        "error_cb": QuietErrors().log, "disconnected_cb": disconnected, "closed_cb": closed,
        "reconnected_cb": _log_reconnected,
    }
    if once_within_s is not None:
        options.update(allow_reconnect=False, max_reconnect_attempts=0,
                       connect_timeout=once_within_s)
    if settings.credentials:
        check_credentials(settings.credentials)
        options["user_credentials"] = settings.credentials
    if settings.tls_ca:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca)
    try:
        await client.connect(**options)
    except asyncio.CancelledError:  # (the bot closing while it connects again) no socket left
        stopped = True
        await client.close()
        raise
    return client


class CredentialsError(Exception):
    """``[cluster] credentials`` cannot be used as it is: said without the file's JWT or seed.
    Retrying does not help (the bot and the worker stop with this sentence)."""


def check_credentials(path: str) -> None:
    """The ``.creds`` file is there, is one (a user JWT, then its NKey seed, as ``nsc`` writes
    them), its JWT has not expired, and nats-py can sign with it (the ``nkeys`` package).
    nats-py reads the file at each (re)connection and, given a file without its JWT, loops for
    ever; the server only answers 'Authorization Violation', whatever the reason."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise CredentialsError(f"[cluster] credentials {path} cannot be read ({reason})"
                               ) from None

    def after(marker: str) -> str:
        found = [n for n, line in enumerate(lines) if marker in line]
        return lines[found[0] + 1].strip() if found and found[0] + 1 < len(lines) else ""

    token, seed = after("BEGIN NATS USER JWT"), after("BEGIN USER NKEY SEED")
    expires = _expiry(token)
    if expires is None or not seed.startswith("SU"):
        raise CredentialsError(
            f"[cluster] credentials {path} is not a NATS .creds file (a user JWT and its "
            "NKey seed, as `nsc generate creds` writes them)")
    if expires and expires <= time.time():
        when = datetime.datetime.fromtimestamp(expires, datetime.UTC)
        raise CredentialsError(
            f"[cluster] credentials {path}: its user JWT expired on "
            f"{when:%Y-%m-%d %H:%M} UTC; ask the NATS server's admin for a new .creds file")
    try:
        import nkeys  # noqa: F401  (nats-py signs the server's nonce with it)
    except ImportError:
        raise CredentialsError("[cluster] credentials needs the nkeys package: "
                               "pip install '.[cluster]'") from None


def _expiry(token: str) -> int | None:
    """A NATS JWT's ``exp`` (0: never expires); None if ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("exp", 0), int):
        return None
    return int(claims.get("exp", 0))


def explain(exc: BaseException) -> str:
    """What went wrong connecting, for an admin: an untrusted server certificate says so and
    names ``tls_ca`` (not only OpenSSL's words), refused credentials name ``credentials`` and
    the url's user; anything else as nats-py says it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the server's TLS certificate was not trusted ({exc.verify_message}): set "
                "[cluster] tls_ca to the CA file that signed it")
    if refused(exc) == "expired":
        return ("the server ended this client's session: its credentials expired; put a new "
                ".creds file at [cluster] credentials")
    if refused(exc):
        return ("the server refused this client (Authorization Violation): set [cluster] "
                "credentials to a .creds file of a user the server trusts, or fix the user and "
                "password in the url")
    return str(exc) or type(exc).__name__


def refused(exc: BaseException) -> str:
    """Whether the server would not have this client: ``expired`` (its JWT ran out while it
    was connected), ``refused`` (no, wrong or expired credentials: NATS tells a client no more
    than that), or "" for anything else."""
    said = str(exc).lower()
    if "authentication expired" in said:
        return "expired"
    if type(exc).__name__ == "AuthorizationError" or "authorization violation" in said:
        return "refused"
    return ""


class QuietErrors:
    """nats-py's error callback: each reason logged once a minute at most. A server that is
    away or refuses this client is retried twice a second, and the log would say so each time;
    the next line says how many repeats it left out."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.said: dict[str, tuple[float, int]] = {}  # reason -> (when logged, repeats since)

    async def log(self, exc: Exception) -> None:  # a coroutine function, as nats-py requires
        reason, now = explain(exc), time.monotonic()
        when, repeats = self.said.get(reason, (-math.inf, 0))
        if now - when < self.every_s:
            self.said[reason] = (when, repeats + 1)
            return
        more = f" (also {repeats} more times in the last {now - when:.0f} s)" if repeats else ""
        log.warning("NATS: %s%s", reason, more)
        self.said[reason] = (now, 0)


async def _log_reconnected() -> None:
    log.info("NATS: reconnected")


async def ensure_streams(js: JetStreamContext, names: Names, settings: ClusterSection
                         ) -> tuple[KeyValue, ObjectStore]:
    """Create the streams and buckets if missing (the bot and every worker call this; the same
    configuration again is no change). File storage: a NATS restart loses nothing."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    file = StorageType.FILE
    await _stream(js, StreamConfig(name=names.jobs_stream, subjects=[names.jobs],
                                   retention=RetentionPolicy.WORK_QUEUE, storage=file,
                                   duplicate_window=DEDUP_WINDOW_S))
    await _stream(js, StreamConfig(name=names.results_stream,
                                   subjects=[names.result("*")], storage=file,
                                   max_age=settings.result_ttl_s, max_msgs_per_subject=1,
                                   allow_direct=True))
    await _stream(js, StreamConfig(name=names.dead_stream, subjects=[names.dead_letters],
                                   storage=file, max_age=settings.result_ttl_s))
    kv = await _bucket(js.create_key_value, js.key_value, bucket=names.workers_bucket,
                       ttl=settings.worker_ttl_s, history=1, storage=file)
    images = await _bucket(js.create_object_store, js.object_store, bucket=names.images_bucket,
                           ttl=settings.result_ttl_s, storage=file)
    return kv, images


async def read_workers(kv: KeyValue) -> dict[str, WorkerInfo]:
    """The workers whose heartbeat has not expired (the bucket's TTL drops the others)."""
    from nats.js.errors import NoKeysError

    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    workers = {}
    for key in keys:
        try:
            entry = await kv.get(key)
        except Exception:  # expired between the two reads
            continue
        if entry.value:
            workers[key] = WorkerInfo.from_bytes(entry.value)
    return workers


async def _stream(js: JetStreamContext, config: Any) -> None:
    from nats.js.errors import BadRequestError

    try:
        await js.add_stream(config)
    except BadRequestError:  # there with other settings (an older config): take ours
        await js.update_stream(config)


async def _bucket(create: Any, existing: Any, *, bucket: str, **settings: Any) -> Any:
    from nats.js.errors import BadRequestError

    try:
        return await create(bucket=bucket, **settings)
    except BadRequestError:  # there with other settings: use it as it is
        log.info("NATS bucket %s exists with other settings; using it", bucket)
        return await existing(bucket)

"""The server-side names of one cluster (``[cluster] name``), and how to connect to it."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
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
    ``once_within_s`` (``doctor``) one try of that long, and an error if the server is away."""
    import nats

    options: dict[str, Any] = {
        "servers": [settings.url], "name": client_name, "allow_reconnect": True,
        "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "connect_timeout": 5,
        "error_cb": _log_error, "disconnected_cb": _log_disconnected,
        "reconnected_cb": _log_reconnected,
    }
    if once_within_s is not None:
        options.update(allow_reconnect=False, max_reconnect_attempts=0,
                       connect_timeout=once_within_s)
    if settings.credentials:
        options["user_credentials"] = settings.credentials
    if settings.tls_ca:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca)
    return await nats.connect(**options)


def explain(exc: BaseException) -> str:
    """What went wrong connecting, for an admin: an untrusted server certificate says so and
    names ``tls_ca`` (not only OpenSSL's words); anything else as nats-py says it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the server's TLS certificate was not trusted ({exc.verify_message}): set "
                "[cluster] tls_ca to the CA file that signed it")
    return str(exc) or type(exc).__name__


async def _log_error(exc: Exception) -> None:
    log.warning("NATS: %s", explain(exc))


async def _log_disconnected() -> None:
    log.warning("NATS: disconnected; reconnecting")


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

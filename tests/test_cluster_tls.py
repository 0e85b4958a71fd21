"""Issue 14: a worker joining over the internet. A real nats-server on loopback with TLS (a
certificate from a CA made here) and JetStream: ``[cluster] tls_ca`` lets the bot's and the
workers' ``connect`` in and use JetStream; without it (or with another CA) ``doctor`` says the
server's certificate was not trusted and to set ``tls_ca``; user and password on the server
work when the URL carries them, and doctor never shows the password."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="the cluster extra (nats-py) is not installed")

from bot.doctor import run_doctor  # noqa: E402
from engine.cluster.names import Names, connect, ensure_streams  # noqa: E402
from engine.config import ClusterSection  # noqa: E402
from tests.cluster_fixtures import cluster_config, free_port, start_configured_server  # noqa: E402

USER, PASSWORD = "worker", "s3cret-pass-word"


def _certificates(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A self-signed CA and a certificate it signed for localhost and 127.0.0.1: the CA's
    file, the server's certificate and its key."""
    x509 = pytest.importorskip("cryptography.x509",
                               reason="the cryptography package makes the test certificates")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def cert(subject: str, key, issuer, issuer_key, *, ca: bool):  # noqa: ANN001, ANN202
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = cert(f"{name} test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = cert("localhost", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = folder / f"{name}-ca.pem", folder / f"{name}-server.pem", folder / f"{name}-key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(server_cert.public_bytes(pem))
    paths[2].write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


class TlsServer:
    """``nats-server -c server.conf``: TLS, JetStream on tmp_path, optionally a user."""

    def __init__(self, folder: Path, *, authorization: bool) -> None:
        self.ca, cert, key = _certificates(folder, "server")
        self.other_ca = _certificates(folder, "other")[0]  # trusts a different server
        self.port = free_port()
        users = (f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}'
                 if authorization else "")
        self.process, self.log = start_configured_server(folder, self.port, f"""
tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}
{users}
""")

    def url(self, auth: str = "") -> str:
        return f"tls://{auth}127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    server = TlsServer(tmp_path, authorization=False)
    yield server
    server.stop()


@pytest.fixture
def tls_server_with_user(tmp_path: Path) -> Iterator[TlsServer]:
    server = TlsServer(tmp_path, authorization=True)
    yield server
    server.stop()


def _settings(url: str, tls_ca: Path | str = "") -> ClusterSection:
    return ClusterSection(url=url, name="tlstest", tls_ca=str(tls_ca))


async def _use_jetstream(settings: ClusterSection) -> bytes:
    """What the bot and a worker do first: connect, create the streams and buckets, then a
    heartbeat into the workers bucket read back."""
    nc = await connect(settings, "tls test", once_within_s=5)
    try:
        assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
        kv, _images = await ensure_streams(nc.jetstream(timeout=5), Names(settings.name),
                                           settings)
        await kv.put("w1", b"alive")
        return (await kv.get("w1")).value or b""
    finally:
        await nc.close()


def _doctor(tmp_path: Path, settings: ClusterSection) -> tuple[int, str]:
    cfg = cluster_config(tmp_path, settings.url)
    cfg.cluster.tls_ca = settings.tls_ca
    lines: list[str] = []
    code = run_doctor(cfg, None, print_fn=lines.append)
    return code, "\n".join(lines)


def test_tls_ca_lets_the_bot_and_workers_in_and_jetstream_works(tls_server) -> None:
    settings = _settings(tls_server.url(), tls_server.ca)
    assert asyncio.run(_use_jetstream(settings)) == b"alive"


def test_doctor_says_the_server_answers_over_tls(tmp_path, tls_server) -> None:
    code, shown = _doctor(tmp_path, _settings(tls_server.url(), tls_server.ca))
    assert f"[ok ] cluster: NATS server {tls_server.url()} reachable, JetStream on" in shown, shown


@pytest.mark.parametrize("which_ca", ["none", "other"])
def test_an_untrusted_certificate_is_named_not_a_timeout(tmp_path, tls_server,
                                                         which_ca) -> None:
    ca = "" if which_ca == "none" else tls_server.other_ca
    settings = _settings(tls_server.url(), ca)
    started = time.monotonic()
    code, shown = _doctor(tmp_path, settings)
    assert code == 1
    assert time.monotonic() - started < 10
    assert (f"[FAIL] cluster: NATS server {tls_server.url()}: the server's TLS certificate "
            "was not trusted (") in shown, shown
    assert "set [cluster] tls_ca to the CA file that signed the server's certificate" in shown
    assert "not reachable" not in shown and "start it" not in shown, shown  # it is there
    assert "timeout" not in shown.lower() and "timed out" not in shown.lower(), shown


def test_a_worker_kept_out_by_the_certificate_logs_why(tls_server, caplog) -> None:
    """The bot's and the workers' connection tries for ever; each try's log line says why."""
    from engine.cluster import names

    async def try_for_a_while() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(connect(_settings(tls_server.url()), "worker"), 2)

    with caplog.at_level("WARNING", logger=names.__name__):
        asyncio.run(try_for_a_while())
    said = [r.getMessage() for r in caplog.records if r.name == names.__name__]
    assert any("the server's TLS certificate was not trusted" in line
               and "set [cluster] tls_ca" in line for line in said), said


def test_user_and_password_in_the_url(tmp_path, tls_server_with_user) -> None:
    server = tls_server_with_user
    good = _settings(server.url(f"{USER}:{PASSWORD}@"), server.ca)
    assert asyncio.run(_use_jetstream(good)) == b"alive"
    code, shown = _doctor(tmp_path, _settings(server.url(f"{USER}:wrong@"), server.ca))
    assert code == 1
    assert (f"[FAIL] cluster: NATS server {server.url(f'{USER}:***@')}: the server refused "
            "this client (Authorization Violation)") in shown, shown
    assert "fix the user and password in the url" in shown, shown
    assert "wrong" not in shown, shown
    code, shown = _doctor(tmp_path, _settings(server.url(f"{USER}:{PASSWORD}@"), server.ca))
    assert f"[ok ] cluster: NATS server {server.url(f'{USER}:***@')} reachable" in shown, shown
    assert PASSWORD not in shown, shown


@pytest.mark.parametrize(("url", "shown"), [
    ("tls://127.0.0.1:4222", "tls://127.0.0.1:4222"),
    ("tls://worker:pa:ss@w@nats.example.org:4222", "tls://worker:***@nats.example.org:4222"),
    ("nats://s3cr3t-token@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
])
def test_public_url_hides_the_password_or_token(url, shown) -> None:
    from engine.config import public_url

    assert public_url(url) == shown


def test_no_user_on_a_server_that_wants_one_is_refused(tmp_path, tls_server_with_user) -> None:
    server = tls_server_with_user
    code, shown = _doctor(tmp_path, _settings(server.url(), server.ca))
    assert code == 1 and "Authorization Violation" in shown, shown


def test_a_bad_cluster_url_is_refused_without_its_password(tmp_path) -> None:
    from engine.config import ConfigError, load_config, url_secret

    path = tmp_path / "config.toml"
    path.write_text('[cluster]\nurl = "http://worker:s3cret-passw0rd@nats.example:4222"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "s3cret-passw0rd" not in str(caught.value)
    assert "http://worker:***@nats.example:4222" in str(caught.value)
    assert url_secret("tls://worker:s3cret-passw0rd@h:4222") == "s3cret-passw0rd"
    assert url_secret("tls://t0ken-only-secret@h:4222") == "t0ken-only-secret"
    assert url_secret("tls://h:4222") == ""

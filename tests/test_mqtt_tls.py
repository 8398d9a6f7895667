"""MQTT over TLS with a password and a client certificate, against a Mosquitto configured for it.

The CA and certificates are made here with ``cryptography``; the broker's password file with
``mosquitto_passwd``. Secrets come from files or systemd credentials, never from the TOML.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import numbers
from conftest import collect, gatewayd_cli, logged, make_config, post, running
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatewayd import config
from gatewayd.config import ConfigError
from gatewayd.testing import Mosquitto

PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
pytestmark = pytest.mark.skipif(
    not Path(PASSWD).exists(), reason="mosquitto_passwd missing (Debian mosquitto)"
)

GW_PASSWORD = "gw1-s3cret-pass"
SUB_PASSWORD = "sub-s3cret-pass"


@dataclass
class Pair:
    cert: Path
    key: Path


class CA:
    """A test certificate authority that writes PEM files into ``dir``."""

    def __init__(self, dir: Path, name: str) -> None:
        self.dir = dir
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self.cert = (
            self._builder(subject, self.key.public_key())
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.file = dir / f"{name}-ca.pem"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, cn: str, *, server: bool) -> Pair:
        """A leaf certificate: for 127.0.0.1 and localhost (server), or a client named ``cn``."""
        key = ec.generate_private_key(ec.SECP256R1())
        b = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), key.public_key())
        b = b.issuer_name(self.cert.subject).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        pair = Pair(self.dir / f"{self.name}-{cn}.pem", self.dir / f"{self.name}-{cn}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pair


@dataclass
class Pki:
    dir: Path
    ca: CA
    server: Pair
    gateway: Pair
    subscriber: Pair
    passwords: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d, "good")
    passwords = d / "passwd"
    for i, (user, pw) in enumerate((("gw1", GW_PASSWORD), ("sub", SUB_PASSWORD))):
        args = [PASSWD, "-b", *(["-c"] if i == 0 else []), str(passwords), user, pw]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    return Pki(d, ca, ca.issue("broker", server=True), ca.issue("gw1", server=False),
               ca.issue("sub", server=False), passwords)  # fmt: skip


def tls_broker(pki: Pki, server: Pair, *, client_cert: bool) -> Mosquitto:
    conf = [
        f"cafile {pki.ca.file}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        "tls_version tlsv1.2",
        f"password_file {pki.passwords}",
        "allow_anonymous false",
    ]
    if client_cert:
        conf.append("require_certificate true")
    return Mosquitto(extra_conf=conf)


def client_context(ca: Path, pair: Pair | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def broker_log(b: Mosquitto) -> str:
    """The broker's log, complete: mosquitto buffers stdout, so it is stopped first."""
    b.stop()
    return (b.dir / "broker.log").read_text(errors="replace")


async def post_one(ctx: aiocoap.Context, port: int, node: str, **fields: Any) -> None:
    answer = await post(ctx, port, node, cbor2.dumps(fields))
    assert answer.code == numbers.codes.CHANGED, answer


async def wait_for(pred: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_tls_password_and_client_certificate_deliver(
    tmp_path: Path, pki: Pki, coap_client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS verified against the test CA, a client certificate and a password from a file: a reading
    POSTed over CoAP reaches a subscriber over TLS; the password appears in no log line or repr."""
    pw = secret(tmp_path / "mqtt-password", GW_PASSWORD)
    tls = {"ca_file": str(pki.ca.file), "cert_file": str(pki.gateway.cert), "key_file": str(pki.gateway.key)}
    mqtt = {"username": "gw1", "password_file": str(pw), "tls": tls}
    with tls_broker(pki, pki.server, client_cert=True) as broker, caplog.at_level(logging.INFO):
        cfg = make_config(tmp_path, broker.port, mqtt=mqtt)
        assert cfg.mqtt.port == broker.port and cfg.mqtt.secret_password() == GW_PASSWORD
        sub_tls = client_context(pki.ca.file, pki.subscriber)
        async with (
            collect(broker.port, tls=sub_tls, username="sub", password=SUB_PASSWORD) as got,
            running(cfg),
        ):
            await post_one(coap_client, cfg.coap.port, "pump-1", temperature=21.5)
            await got.wait(lambda g: g.json("readings/pump-1"))
            await got.wait(lambda g: any(p == b"online" for t, p, _ in g.messages if t.endswith("/status")))
        assert got.json("readings/pump-1")[0]["fields"] == {"temperature": 21.5}
        seen_by_broker = broker_log(broker)
    connected = logged(caplog, "mqtt_connected")
    assert connected and connected[0]["tls"] is True and connected[0]["username"] == "gw1"
    assert GW_PASSWORD not in caplog.text and GW_PASSWORD not in repr(cfg) and GW_PASSWORD not in str(cfg)
    assert "New client connected" in seen_by_broker and "u'gw1'" in seen_by_broker


async def test_wrong_password_is_logged_kept_and_delivered_once_fixed(
    tmp_path: Path,
    pki: Pki,
    coap_client: aiocoap.Context,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused password is logged as not authorised and retried; CoAP still answers 2.04 and the
    reading is kept; after the fix (a systemd credential this time) it is delivered."""
    tls = {"ca_file": str(pki.ca.file)}
    wrong = secret(tmp_path / "wrong", "not-the-password")
    with tls_broker(pki, pki.server, client_cert=False) as broker:
        sub_tls = client_context(pki.ca.file, None)
        async with collect(broker.port, tls=sub_tls, username="sub", password=SUB_PASSWORD) as got:
            cfg = make_config(
                tmp_path,
                broker.port,
                mqtt={"username": "gw1", "password_file": str(wrong), "tls": tls, "drain_timeout_s": 0.5},
            )
            with caplog.at_level(logging.INFO):
                async with running(cfg) as app:
                    await wait_for(lambda: len(logged(caplog, "mqtt_not_authorised")) >= 2)
                    await post_one(coap_client, cfg.coap.port, "pump-2", vibration=0.3)
                    assert app.store.outbox_count >= 1 and not app.publisher.connected
            refused = logged(caplog, "mqtt_not_authorised")
            assert all(e["level"] == "error" for e in refused)
            assert "not authori" in refused[0]["error"].lower() or "bad user" in refused[0]["error"].lower()
            assert not got.json("readings/pump-2") and not logged(caplog, "mqtt_connected")

            creds = tmp_path / "creds"
            creds.mkdir()
            secret(creds / "mqtt-password", GW_PASSWORD)
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
            fixed = {"username": "gw1", "password_credential": "mqtt-password", "tls": tls}
            async with running(make_config(tmp_path, broker.port, mqtt=fixed)):
                await got.wait(lambda g: g.json("readings/pump-2"))
    assert got.json("readings/pump-2")[0]["fields"] == {"vibration": 0.3}
    assert "not-the-password" not in caplog.text


@pytest.mark.parametrize("case", ["other CA", "other name"])
async def test_unverifiable_broker_is_refused_and_nothing_is_sent(
    tmp_path: Path, pki: Pki, coap_client: aiocoap.Context, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """A broker whose certificate comes from another CA, or names another host, fails verification:
    logged with the reason, retried, no MQTT CONNECT (so no password) ever reaches it, readings kept."""
    tls: dict[str, Any] = {"ca_file": str(pki.ca.file)}
    if case == "other CA":
        server = CA(pki.dir, "rogue").issue("broker", server=True)
        reason = "certificate verify failed"
    else:
        server = pki.server
        tls["server_hostname"] = "broker.example"
        reason = "hostname mismatch"
    pw = secret(tmp_path / "pw", GW_PASSWORD)
    with tls_broker(pki, server, client_cert=False) as broker, caplog.at_level(logging.INFO):
        cfg = make_config(
            tmp_path,
            broker.port,
            mqtt={"username": "gw1", "password_file": str(pw), "tls": tls, "drain_timeout_s": 0.5},
        )
        async with running(cfg) as app:
            await wait_for(lambda: len(logged(caplog, "mqtt_tls_failed")) >= 2)
            await post_one(coap_client, cfg.coap.port, "pump-3", temperature=1.0)
            assert app.store.outbox_count >= 1 and not app.publisher.connected
        seen_by_broker = broker_log(broker)
    failed = logged(caplog, "mqtt_tls_failed")
    assert reason in failed[0]["error"].lower() and failed[0]["level"] == "error", failed[0]
    assert not logged(caplog, "mqtt_connected")
    assert "New client connected" not in seen_by_broker and "CONNECT" not in seen_by_broker


def test_password_in_the_toml_is_refused_with_file_line_and_key(tmp_path: Path) -> None:
    """`password = ...` under [mqtt] is a config error naming file:line: key and what to use instead."""
    conf = tmp_path / "gw.toml"
    conf.write_text(
        '[gateway]\nid = "gw1"\n\n[mqtt]\nhost = "broker"\nusername = "gw1"\npassword = "hunter2"\n'
    )
    out = gatewayd_cli("check-config", str(conf))
    assert out.returncode == 2
    assert f"{conf}:7: mqtt.password: " in out.stderr and "password_file" in out.stderr, out.stderr
    assert "password_credential" in out.stderr and "hunter2" not in out.stderr + out.stdout


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "gw.toml")
    return e.value.problems


def test_secret_files_and_credentials_are_checked_at_load(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Missing or empty secret files, an unset CREDENTIALS_DIRECTORY, a key that does not fit its
    certificate, half a client certificate: each a config error at load, naming line and key."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    head = '[mqtt]\nusername = "gw1"\n'
    missing = problems(head + f'password_file = "{tmp_path}/none"\n')
    assert missing[0].startswith("gw.toml:3: mqtt.password_file: ") and "cannot read" in missing[0]
    empty = secret(tmp_path / "empty", "")
    assert "is empty" in problems(head + f'password_file = "{empty}"\n')[0]
    unset = problems(head + 'password_credential = "mqtt-password"\n')
    assert (
        unset[0].startswith("gw.toml:3: mqtt.password_credential: ") and "CREDENTIALS_DIRECTORY" in unset[0]
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert "cannot read" in problems(head + 'password_credential = "mqtt-password"\n')[0]
    secret(tmp_path / "mqtt-password", "pw from a credential")
    cfg = config.parse(head + 'password_credential = "mqtt-password"\n', "gw.toml")
    assert cfg.mqtt.secret_password() == "pw from a credential" and cfg.mqtt.port == 1883
    assert "password_credential" in problems(head + 'password_credential = "../etc/shadow"\n')[0]
    assert "needs username" in problems(f'[mqtt]\npassword_file = "{tmp_path}/mqtt-password"\n')[0]

    tls = f'[mqtt]\nhost = "b"\n\n[mqtt.tls]\nca_file = "{pki.ca.file}"\n'
    cfg = config.parse(tls, "gw.toml")
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls is not None
    wrong_key = problems(tls + f'cert_file = "{pki.gateway.cert}"\nkey_file = "{pki.subscriber.key}"\n')
    assert wrong_key[0].startswith("gw.toml:7: mqtt.tls.key_file: "), wrong_key
    half = problems(tls + f'cert_file = "{pki.gateway.cert}"\n')
    assert half[0].startswith("gw.toml:4: mqtt.tls: ") and "key_file" in half[0], half
    not_ca = problems(f'[mqtt.tls]\nca_file = "{pki.gateway.key}"\n')
    assert not_ca[0].startswith("gw.toml:2: mqtt.tls.ca_file: "), not_ca
    shutil.copy(pki.gateway.key, tmp_path / "client.key")
    by_cred = config.parse(
        tls + f'cert_file = "{pki.gateway.cert}"\nkey_credential = "client.key"\n', "gw.toml"
    )
    assert by_cred.mqtt.tls is not None and by_cred.mqtt.tls.key_path() == tmp_path / "client.key"


@pytest.fixture(autouse=True)
def _no_inherited_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A CREDENTIALS_DIRECTORY of the shell running the tests must not leak into them."""
    if "CREDENTIALS_DIRECTORY" in os.environ:
        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    yield

"""Publish the store's outbox to MQTT: in order, QoS 1, deleted only after the broker's PUBACK.

Topics (``base`` = ``{prefix}/{gateway}``):
  ``base/readings/{node}``          every accepted reading
  ``base/results/{plugin}/{node}``  every plugin result
  ``base/status``                   retained ``online``; ``offline`` is the last will
  ``base/status/plugins/{plugin}``  retained JSON state of each plugin
  ``base/cmd/...``                  commands to the gateway (subscribed), and their responses
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.reasoncodes import ReasonCode

from gatewayd.config import MqttConfig, MqttTlsConfig
from gatewayd.store import OutboxEntry, Store, StoreError
from gatewayd.supervisor import backoff_delay

log = structlog.get_logger("gatewayd.mqtt")


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return base64.b64encode(v).decode("ascii")
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def encode(base: str, e: OutboxEntry) -> tuple[str, bytes]:
    """The topic and JSON payload of an outbox entry; each payload carries the reading's id."""
    r = e.reading
    if e.plugin is None:
        doc: dict[str, Any] = {"id": r.id, "node": r.node, "ts": r.ts, "fields": dict(r.fields)}
        if r.units:
            doc["units"] = dict(r.units)
        topic = f"{base}/readings/{r.node}"
    else:
        doc = {**(e.result or {}), "reading_id": r.id, "node": r.node, "ts": r.ts, "plugin": e.plugin}
        topic = f"{base}/results/{e.plugin}/{r.node}"
    return topic, json.dumps(doc, default=_json_default, separators=(",", ":")).encode()


def tls_context(cfg: MqttTlsConfig) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, the broker's chain checked against ca_file (else the system's CAs)
    and its name against server_hostname (else the host connected to); a client certificate if set."""
    ctx = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    ctx.server_name_override = cfg.server_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.cert_file is not None:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_path()))
    return ctx


class _ServerNameContext(ssl.SSLContext):
    """Verifies the broker's certificate against ``server_name_override`` when set.

    paho passes its ``host`` as server_hostname (SNI and the name checked); this is the one place
    to put another name, e.g. when the broker is reached by IP address.
    """

    server_name_override: str | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.server_name_override is not None:
            kwargs["server_hostname"] = self.server_name_override
        return super().wrap_socket(*args, **kwargs)


#: MQTT 5 reason codes (paho gives MQTT 3.1.1's CONNACK codes 4 and 5 as 134 and 135) that mean
#: "fix the credentials or the broker's ACL": bad user name or password, not authorised, bad auth method.
_AUTH_CODES = frozenset({134, 135, 140})


def _failure(e: Exception) -> tuple[str, str]:
    """The log event and reason for a lost or refused connection: credentials, TLS, or anything else."""
    if isinstance(e, aiomqtt.MqttCodeError) and isinstance(e.rc, ReasonCode) and e.rc.value in _AUTH_CODES:
        return "mqtt_not_authorised", f"{e.rc} (reason code {e.rc.value})"
    text = str(e)
    # aiomqtt turns ssl's errors into MqttError(str(exc)): the text is all that is left of them.
    if "SSL" in text or "certificate" in text.lower():
        return "mqtt_tls_failed", text
    return "mqtt_disconnected", text


class _Broken(Exception):
    """A publish failed: leave the connection and reconnect."""


class Publisher:
    def __init__(self, cfg: MqttConfig, gateway: str, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.base = f"{cfg.prefix}/{gateway}"
        self.status_topic = f"{self.base}/status"
        self.client_id = cfg.client_id or f"gatewayd-{gateway}"
        self.connected = False
        self.published = 0
        self.reconnects = 0
        self._wake = asyncio.Event()
        self._live: dict[str, bytes] = {}
        self._live_dirty: set[str] = set()
        self._commands: dict[str, Callable[[bytes], None]] = {}
        # Responses to commands while disconnected: kept in memory, the latest ones.
        self._notes: deque[tuple[str, bytes]] = deque(maxlen=1000)
        self._stopping = False
        self._stop_by = 0.0
        self._rng = random.Random()
        # Built once: the CA, certificate and key are read at start, as the password was at load.
        self._tls = tls_context(cfg.tls) if cfg.tls is not None and cfg.tls.enabled else None
        if self._tls is None and cfg.secret_password() is not None:
            log.warning("mqtt_password_in_clear", host=cfg.host, hint="add [mqtt.tls] to encrypt it")

    def wake(self) -> None:
        """New outbox entries exist: stop waiting."""
        self._wake.set()

    def set_live(self, suffix: str, doc: dict[str, Any]) -> None:
        """Publish ``doc`` retained on ``base/suffix``, now if connected, else on connect."""
        topic = f"{self.base}/{suffix}"
        self._live[topic] = json.dumps(doc, separators=(",", ":")).encode()
        self._live_dirty.add(topic)
        self._wake.set()

    def on_command(self, suffix: str, handler: Callable[[bytes], None]) -> None:
        """Call ``handler`` with each payload sent to ``base/suffix`` (subscribed at QoS 1 on connect)."""
        self._commands[f"{self.base}/{suffix}"] = handler

    def note(self, suffix: str, doc: dict[str, Any]) -> None:
        """Publish ``doc`` once, QoS 1, not retained, on ``base/suffix`` (a command's response)."""
        self._notes.append((f"{self.base}/{suffix}", json.dumps(doc, separators=(",", ":")).encode()))
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        """Publish what is in the outbox for at most ``timeout_s`` more, then go offline."""
        self._stopping = True
        self._stop_by = time.monotonic() + timeout_s
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with self._client() as client:
                    self.connected = True
                    log.info(
                        "mqtt_connected", host=self.cfg.host, port=self.cfg.port, tls=self._tls is not None,
                        username=self.cfg.username, failures=failures,
                    )  # fmt: skip
                    failures = 0
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    self._live_dirty = set(self._live)
                    for topic in self._commands:
                        await client.subscribe(topic, qos=1)
                    listener = asyncio.create_task(self._listen(client))
                    try:
                        await self._drain(client)
                    finally:
                        listener.cancel()
                    await client.publish(self.status_topic, b"offline", qos=1, retain=True)
                    self.connected = False
                    return
            except (aiomqtt.MqttError, _Broken) as e:
                self.connected = False
                if self._stopping and time.monotonic() >= self._stop_by:
                    log.warning("mqtt_stopped_disconnected", outbox=self.store.outbox_count)
                    return
                failures += 1
                self.reconnects += 1
                delay = backoff_delay(failures, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng)
                if self._stopping:
                    delay = min(delay, max(0.0, self._stop_by - time.monotonic()))
                event, reason = _failure(e)
                # Refused credentials and failed TLS are the operator's to fix: say so at error level.
                level = log.warning if event == "mqtt_disconnected" else log.error
                level(event, error=reason, host=self.cfg.host, port=self.cfg.port, retry_in_s=round(delay, 2))
                self._wake.clear()
                if self._stopping:
                    # Already draining: wait out the (capped) backoff; returning at once made a hot
                    # loop of refused connections until drain_timeout_s (~1,000 attempts in 5 s).
                    await asyncio.sleep(delay)
                    continue
                with contextlib.suppress(TimeoutError):  # a stop cuts the backoff short: one last try
                    await asyncio.wait_for(self._wait_stop(), delay)

    async def _wait_stop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    def _client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.cfg.host,
            self.cfg.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self.cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
            keepalive=self.cfg.keepalive_s,
            timeout=10,
            max_inflight_messages=self.cfg.max_inflight,
            username=self.cfg.username,
            password=self.cfg.secret_password(),
            tls_context=self._tls,
        )
        client.pending_calls_threshold = self.cfg.max_inflight * 2
        return client

    async def _listen(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            handler = self._commands.get(str(m.topic))
            if handler is None or not isinstance(m.payload, bytes):
                continue
            if m.retain:  # a retained command would run again at each reconnect, however old
                log.warning("mqtt_retained_command_ignored", topic=str(m.topic))
                continue
            try:
                handler(m.payload)
            except Exception:  # a bug in one command must not end the gateway's listening
                log.exception("mqtt_command_failed", topic=str(m.topic))

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish outbox entries in order with up to max_inflight awaiting PUBACK."""
        slots = asyncio.Semaphore(self.cfg.max_inflight)
        acked: list[int] = []
        failed: list[BaseException] = []
        tasks: set[asyncio.Task[None]] = set()

        async def publish(e: OutboxEntry) -> None:
            try:
                topic, payload = encode(self.base, e)
                await client.publish(topic, payload, qos=1)
                acked.append(e.id)
                self._wake.set()
            except aiomqtt.MqttError as err:
                failed.append(err)
                self._wake.set()
            finally:
                slots.release()

        cursor = 0  # after a reconnect everything not yet acknowledged is sent again
        try:
            while True:
                self._wake.clear()
                for topic in list(self._live_dirty):
                    self._live_dirty.discard(topic)
                    await client.publish(topic, self._live[topic], qos=1, retain=True)
                while self._notes:
                    await client.publish(*self._notes[0], qos=1)
                    self._notes.popleft()
                if acked:
                    done, acked[:] = list(acked), []
                    await self._delete(done)
                    self.published += len(done)
                if failed:
                    raise _Broken(str(failed[0]))
                if self._stopping and time.monotonic() >= self._stop_by:
                    log.warning("mqtt_drain_timeout", outbox=self.store.outbox_count)
                    return
                entries = await self.store.outbox_after(cursor, self.cfg.max_inflight)
                if not entries:
                    if self._stopping and not tasks:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                for e in entries:
                    await slots.acquire()
                    if failed:
                        slots.release()
                        break
                    task = asyncio.create_task(publish(e))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    cursor = e.id
        finally:
            for t in list(tasks):
                t.cancel()

    async def _delete(self, ids: list[int]) -> None:
        try:
            await self.store.outbox_delete(ids)
        except StoreError as e:
            # Not deleted means sent again later: a duplicate with the same id, never a loss.
            log.error("outbox_delete_failed", error=str(e), count=len(ids))

"""The gateway's TOML config, validated by pydantic, with errors that name file, line and key."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayConfig(_Strict):
    id: Annotated[str, Field(pattern=_NAME)] = "gw1"


class CoapConfig(_Strict):
    bind: str = "::"
    port: Annotated[int, Field(ge=0, le=65535)] = 5683
    #: Largest request body accepted, whole or block-wise (4.13 with Size1 above it).
    max_body_bytes: Annotated[int, Field(ge=64, le=16 * 1024 * 1024)] = 8192
    #: Block-wise uploads open at once (each holds up to max_body_bytes); a new one beyond: 5.03.
    max_uploads: Annotated[int, Field(ge=1, le=10_000)] = 16
    #: An upload with no block for this long is dropped and its memory freed (the node gets 4.08
    #: if it goes on). RFC 7959 leaves it to the server; a node retransmits a block for up to 93 s.
    upload_timeout_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    #: Cap on remembered (remote, message-id) pairs for duplicate detection; see README.
    dedup_max_entries: Annotated[int, Field(ge=100)] = 20_000
    #: How long a pair is remembered (RFC 7252 EXCHANGE_LIFETIME).
    dedup_lifetime_s: Annotated[float, Field(gt=0, le=247)] = 247.0
    #: Requests being decoded and stored at once; beyond this, 5.03 with Max-Age (overload).
    max_inflight_requests: Annotated[int, Field(ge=1)] = 512
    #: Max-Age sent with an overload 5.03.
    overload_retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 2
    #: Behind a backlog (more requests waiting than one turn of the event loop parses), a request
    #: that waited longer than this in the socket gets 5.03 "overloaded" without being parsed, so the
    #: excess is answered, not dropped.
    shed_after_ms: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    #: SO_RCVBUF asked for the CoAP socket; Linux caps it at net.core.rmem_max (logged when it does).
    receive_buffer_bytes: Annotated[int, Field(ge=4096, le=256 * 1024 * 1024)] = 4 * 1024 * 1024
    #: How long an answer may take before an empty ACK is sent and the answer follows as a separate
    #: CON; kept below a client's ACK_TIMEOUT (2 s) so nodes do not retransmit meanwhile.
    empty_ack_delay_s: Annotated[float, Field(gt=0, lt=2.0)] = 1.0


class StoreConfig(_Strict):
    path: Path = Path("/var/lib/gatewayd/gatewayd.db")
    #: Readings kept until published and processed; beyond this, POSTs get 5.03.
    max_readings: Annotated[int, Field(ge=10)] = 1_000_000
    #: SQLite synchronous mode in WAL: FULL survives power loss, NORMAL only a crash of gatewayd.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: Most requests folded into one commit.
    max_group: Annotated[int, Field(ge=1, le=10_000)] = 512
    #: Max-Age (seconds) sent with 5.03 when the store is full.
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 30


class NodeLimitConfig(_Strict):
    """Per-node token bucket: one chatty or broken node cannot starve the rest."""

    #: Sustained requests per second per node; 0 turns the limit off.
    rate_per_s: Annotated[float, Field(ge=0)] = 50.0
    #: Requests a node may send in a burst above the rate.
    burst: Annotated[int, Field(ge=1)] = 100
    #: Nodes tracked at once (least recently seen forgotten first).
    max_nodes: Annotated[int, Field(ge=1)] = 100_000


class MetricsConfig(_Strict):
    """The Prometheus endpoint (prometheus-client); loopback by default."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


#: A systemd credential name (LoadCredential=NAME:...): a plain file name in $CREDENTIALS_DIRECTORY,
#: not "." or "..".
_CREDENTIAL = r"^[A-Za-z0-9_.@:-]*[A-Za-z0-9_@:-][A-Za-z0-9_.@:-]*$"
_NO_SECRETS_IN_TOML = (
    "secrets are not read from the config file: put the password in a file readable only by gatewayd "
    "and set password_file, or use password_credential with systemd's LoadCredential="
)


def credential_path(name: str) -> Path:
    """Where systemd put the credential ``name`` (LoadCredential=/SetCredential=) for this service."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ValueError(
            f"credential {name!r} needs $CREDENTIALS_DIRECTORY, which is not set: run gatewayd under "
            f"systemd with LoadCredential={name}:/path/to/file (systemd-run -p LoadCredential=... for "
            "check-config), or set CREDENTIALS_DIRECTORY to a directory that holds the file"
        )
    return Path(directory) / name


def _read_secret(path: Path) -> str:
    """The secret in ``path``: its text without the trailing newline an editor adds."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{path} is empty")
    if len(text.encode()) > 65535:  # MQTT's limit for the password field
        raise ValueError(f"{path} holds more than 65535 bytes")
    return text


class MqttTlsConfig(_Strict):
    """TLS to the broker; the server's certificate chain and name are always verified."""

    #: False keeps the table but connects in clear (e.g. while testing a config).
    enabled: bool = True
    #: CA certificate(s) (PEM) the broker's certificate must chain to; default: the system's CAs.
    ca_file: Path | None = None
    #: Client certificate (PEM, may include intermediates), for brokers that require one.
    cert_file: Path | None = None
    #: The client certificate's private key (PEM, unencrypted); or key_credential.
    key_file: Path | None = None
    #: The private key as a systemd credential (LoadCredential=NAME:/etc/gatewayd/client.key).
    key_credential: Annotated[str | None, Field(pattern=_CREDENTIAL, max_length=255)] = None
    #: The name the broker's certificate must carry, when it is not ``host`` (e.g. host is an IP).
    server_hostname: Annotated[str | None, Field(min_length=1)] = None

    @field_validator("ca_file")
    @classmethod
    def _ca_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(v))
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"cannot load CA certificates from {v}: {e}") from None
        return v

    @field_validator("cert_file")
    @classmethod
    def _cert_readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                v.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read {v}: {e.strerror or e}") from None
        return v

    @field_validator("key_file", "key_credential")
    @classmethod
    def _key_matches(cls, v: Path | str | None, info: ValidationInfo) -> Path | str | None:
        if v is None:
            return v
        if "cert_file" not in info.data:
            return v  # cert_file's own error says what is wrong
        cert = info.data["cert_file"]
        if cert is None:
            raise ValueError("a client key needs cert_file")
        key = credential_path(v) if isinstance(v, str) else v
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load the client certificate {cert} with the key {key}: {e}") from None
        return v

    @model_validator(mode="after")
    def _cert_needs_key(self) -> MqttTlsConfig:
        if self.key_file is not None and self.key_credential is not None:
            raise ValueError("set key_file or key_credential, not both")
        if self.cert_file is not None and self.key_file is None and self.key_credential is None:
            raise ValueError("cert_file needs key_file or key_credential")
        return self

    def key_path(self) -> Path | None:
        """The client key's file: key_file, or the credential's file."""
        if self.key_credential is not None:
            return credential_path(self.key_credential)
        return self.key_file


class MqttConfig(_Strict):
    host: str = "127.0.0.1"
    #: Default 1883, or 8883 when [mqtt.tls] is on.
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    prefix: Annotated[str, Field(min_length=1)] = "gatewayd"
    client_id: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    #: QoS 1 publishes in flight at once; each is deleted from the outbox only on PUBACK.
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 100
    backoff_initial_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    #: On shutdown, how long to keep publishing the outbox before leaving the rest for the next start.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 5.0
    #: Sent with the password (MQTT CONNECT); a broker may also take a username alone.
    username: Annotated[str | None, Field(min_length=1)] = None
    #: A file holding the password (its first line's end is stripped), read at load.
    password_file: Path | None = None
    #: The password as a systemd credential: $CREDENTIALS_DIRECTORY/NAME (LoadCredential=NAME:/path).
    password_credential: Annotated[str | None, Field(pattern=_CREDENTIAL, max_length=255)] = None
    #: Never accepted (see _NO_SECRETS_IN_TOML); declared so the error names it and says what to do.
    password: Annotated[Any, Field(exclude=True, repr=False)] = None
    tls: MqttTlsConfig | None = None

    _password: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and "port" not in data:
            tls = data.get("tls")
            if isinstance(tls, dict) and tls.get("enabled", True) is True:
                data = {**data, "port": 8883}
        return data

    @field_validator("password")
    @classmethod
    def _no_password(cls, v: Any) -> Any:
        raise ValueError(_NO_SECRETS_IN_TOML)

    @field_validator("password_file")
    @classmethod
    def _password_file_readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            _read_secret(v)
        return v

    @field_validator("password_credential")
    @classmethod
    def _password_credential_readable(cls, v: str | None) -> str | None:
        if v is not None:
            _read_secret(credential_path(v))
        return v

    @model_validator(mode="after")
    def _load_password(self) -> MqttConfig:
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("set password_file or password_credential, not both")
        source = self.password_file or (
            credential_path(self.password_credential) if self.password_credential else None
        )
        if source is not None:
            if self.username is None:
                raise ValueError("password_file / password_credential needs username")
            # Read once here, so check-config catches what run would fail on; kept out of repr and logs.
            self._password = SecretStr(_read_secret(source))
        return self

    def secret_password(self) -> str | None:
        """The password read from password_file or password_credential (never logged)."""
        return self._password.get_secret_value() if self._password is not None else None

    @field_validator("prefix")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if any(c in v for c in "+#\0") or v.startswith("/") or v.endswith("/"):
            raise ValueError("prefix must not contain + # NUL or start/end with /")
        return v


class MatchRule(_Strict):
    """Which readings a plugin gets: all lists must match (an empty list matches anything)."""

    #: Node ids, with shell-style wildcards ("pump-*").
    nodes: list[str] = []
    #: The reading must carry at least one of these fields.
    fields: list[str] = []


class FallbackConfig(_Strict):
    """What serves a plugin's readings while its main worker is in backoff or cooling down."""

    #: Another plugin (entry point or module:Class); default: the same plugin with ``options``.
    plugin: str | None = None
    #: Options for the fallback, e.g. the path of an FP32 or smaller model.
    options: dict[str, Any] = {}
    #: Instead of a model, answer each reading with a result flagged ``degraded``.
    degraded: bool = False


class UpdatePolicy(_Strict):
    """How a model update over the air is judged before and after the switch (README, "Model updates")."""

    #: Live readings the new model answers in shadow, beside the serving one, before the switch.
    shadow_readings: Annotated[int, Field(ge=0)] = 20
    #: Decide on what came in by then (the warm-up on the plugin's sample, if no reading came).
    shadow_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    #: Share of the shadow answers (the plugin's answer_keys) that must equal the serving model's.
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.9
    #: p95 inference time per reading the new model must keep, in shadow and on probation;
    #: default: twice the serving model's p95 in the same shadow run.
    latency_budget_ms: Annotated[float | None, Field(gt=0)] = None
    #: Readings the new model serves after the switch with no failed batch or worker, within the
    #: budget; a failure rolls back to the previous bundle at once.
    probation_readings: Annotated[int, Field(ge=0)] = 50
    #: Probation ends by then even on a quiet gateway.
    probation_timeout_s: Annotated[float, Field(gt=0)] = 600.0


def _existing_cpu(cpu: int) -> int:
    count = os.cpu_count() or 1
    if not 0 <= cpu < count:
        raise ValueError(f"CPU {cpu} does not exist here (CPUs 0-{count - 1})")
    return cpu


class PluginConfig(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    #: An entry-point name in group gatewayd.plugins, or "module:Class".
    plugin: Annotated[str, Field(min_length=1)]
    enabled: bool = True
    match: MatchRule = MatchRule()
    #: Worker processes serving this plugin's queue.
    instances: Annotated[int, Field(ge=1, le=64)] = 1
    #: Under contention for inference slots a higher class is served first.
    priority: Literal["high", "normal", "low"] = "normal"
    #: onnxruntime intra-op threads per worker; default: the runtime's threads per slot.
    threads: Annotated[int | None, Field(ge=1, le=256)] = None
    #: CPUs its workers may run on (sched_setaffinity), e.g. to keep inference off the ingest's core.
    cpus: list[Annotated[int, AfterValidator(_existing_cpu)]] | None = None
    max_batch: Annotated[int, Field(ge=1, le=4096)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=60_000)] = 20.0
    #: Readings waiting for this plugin; beyond this, POSTs whose readings would go to it get 5.03.
    queue_size: Annotated[int, Field(ge=1)] = 10_000
    #: A reading older than this (from its ``ts``) when its batch would start gets an ``expired`` result.
    max_age_s: Annotated[float | None, Field(gt=0)] = None
    #: Per-batch deadline; a worker that takes longer is killed and restarted.
    deadline_s: Annotated[float, Field(gt=0)] = 10.0
    #: Time allowed to import, load and warm up.
    load_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    #: Attempts at one batch before its readings get error results.
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    #: A worker whose RSS passes this between batches is replaced (native leaks).
    memory_limit_mb: Annotated[int | None, Field(ge=16)] = None
    backoff_initial_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    #: More than this many restarts within restart_window_s: cool down for cooldown_s, then try again.
    restart_budget: Annotated[int, Field(ge=1)] = 5
    restart_window_s: Annotated[float, Field(gt=0)] = 300.0
    cooldown_s: Annotated[float, Field(gt=0)] = 120.0
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 5
    fallback: FallbackConfig | None = None
    #: Model updates over the air, for a plugin that takes bundles (its bundle_option).
    update: UpdatePolicy = UpdatePolicy()
    options: dict[str, Any] = {}


class RuntimeConfig(_Strict):
    """The CPU budget shared by all plugins."""

    #: Batches running at once across all plugins; default: the number of CPUs.
    inference_slots: Annotated[int | None, Field(ge=1, le=256)] = None
    #: onnxruntime intra-op threads per worker unless a plugin sets its own; default: CPUs / slots.
    threads_per_slot: Annotated[int | None, Field(ge=1, le=256)] = None

    def slots(self) -> int:
        return self.inference_slots or os.cpu_count() or 1

    def threads(self) -> int:
        return self.threads_per_slot or max(1, (os.cpu_count() or 1) // self.slots())


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class SecurityConfig(_Strict):
    """Who may post readings: per-node OSCORE identities, and what unprotected posts get (README,
    "Node identity (OSCORE)"). The default refuses every unprotected post."""

    #: A POST without OSCORE: "refuse" (4.01); "allow-listed": only nodes in allow_nodes from networks in
    #: allow_from; "allow": any node (from allow_from if set), for closed test networks.
    unauthenticated: Literal["refuse", "allow-listed", "allow"] = "refuse"
    #: Node ids (shell-style wildcards: "meter-*") that may post unprotected under "allow-listed".
    allow_nodes: list[Annotated[str, Field(min_length=1)]] = []
    #: Source networks unprotected posts are taken from ("10.0.0.0/8", "fd00::/8"); needed by "allow-listed".
    allow_from: list[str] = []
    #: Credentials label -> node id, for labels that are not ":" + the node id.
    identities: dict[str, Annotated[str, Field(pattern=_NAME)]] = {}
    #: aiocoap credentials map (JSON) naming one OSCORE context directory per node; the directories
    #: must be writable (sequence numbers). `gatewayd nodes provision` writes both.
    oscore_credentials: Path | None = None

    @field_validator("allow_from")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net)
            except ValueError as e:
                raise ValueError(f"{net!r}: {e}") from None
        return v

    @field_validator("oscore_credentials")
    @classmethod
    def _usable_credentials(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None:
            from gatewayd import credentials  # imports the intake's node-id rule; only when used

            try:
                credentials.read(v, info.data.get("identities"))
            except credentials.CredentialsError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _complete(self) -> SecurityConfig:
        if self.unauthenticated == "allow-listed" and not (self.allow_nodes and self.allow_from):
            raise ValueError('unauthenticated = "allow-listed" needs both allow_nodes and allow_from')
        if self.identities and self.oscore_credentials is None:
            raise ValueError("identities map labels of oscore_credentials, which is not set")
        return self


def _trusted_key(v: Path) -> Path:
    from gatewayd import bundle  # cryptography only when keys are configured

    bundle.load_public_key(v)  # its ValueError names the file and what is wrong
    return v


class ModelsConfig(_Strict):
    """Who may publish model bundles to this gateway (README, "Model bundles")."""

    #: Ed25519 public keys (PEM) whose signatures on a bundle's manifest.sig are trusted.
    trusted_keys: list[Annotated[Path, AfterValidator(_trusted_key)]] = []
    #: Refuse unsigned bundles; default: true when trusted_keys are set.
    require_signature: bool | None = None
    #: Where bundles installed by updates live (per plugin: versions, current, previous);
    #: default: "models" beside the store.
    store: Path | None = None

    @model_validator(mode="after")
    def _keys_for_signatures(self) -> ModelsConfig:
        if self.require_signature and not self.trusted_keys:
            raise ValueError("require_signature = true needs trusted_keys")
        return self

    def signature_required(self) -> bool:
        return bool(self.trusted_keys) if self.require_signature is None else self.require_signature

    def store_path(self, store: StoreConfig) -> Path:
        return self.store if self.store is not None else store.path.parent / "models"

    def environ(self) -> dict[str, str]:
        """The policy as the environment a plugin worker inherits (gatewayd.bundle.verify_for_gateway)."""
        from gatewayd import bundle

        return {
            bundle.ENV_TRUSTED_KEYS: os.pathsep.join(str(p.resolve()) for p in self.trusted_keys),
            bundle.ENV_REQUIRE_SIGNATURE: "1" if self.signature_required() else "0",
        }


class Config(_Strict):
    gateway: GatewayConfig = GatewayConfig()
    coap: CoapConfig = CoapConfig()
    store: StoreConfig = StoreConfig()
    mqtt: MqttConfig = MqttConfig()
    log: LogConfig = LogConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    limits: NodeLimitConfig = NodeLimitConfig()
    metrics: MetricsConfig = MetricsConfig()
    security: SecurityConfig = SecurityConfig()
    models: ModelsConfig = ModelsConfig()
    plugins: list[PluginConfig] = []

    @model_validator(mode="after")
    def _unique_plugin_names(self) -> Config:
        names = [p.name for p in self.plugins]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"plugin names must be unique; repeated: {', '.join(dups)}")
        return self


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` are 'file:line: key: message' lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load(path: Path) -> Config:
    """Read and validate a config file, or raise ConfigError naming file, line and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {e}"]) from None
    return parse(text, str(path))


def parse(text: str, filename: str) -> Config:
    """Validate TOML text; ``filename`` is used in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line N, column M)".
        raise ConfigError([f"{filename}: invalid TOML: {e}"]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [p for p in err["loc"] if not isinstance(p, str) or not p.startswith("function-")]
            line = _line_of(text, loc)
            key = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{filename}:{line}: {key}: {err['msg']}")
        raise ConfigError(problems) from None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\"'.-]+)\s*=")


def _line_of(text: str, loc: list[int | str]) -> int:
    """Best line for a pydantic error location: the key's line, else its table's header, else 1.

    tomllib keeps no positions, so this walks the headers and keys: enough for
    the config's flat tables, arrays of tables ([[plugins]]) and dotted keys.
    """
    counters: dict[str, int] = {}
    table: list[int | str] = []
    best = 1
    for n, raw in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(raw):
            parts: list[int | str] = [p.strip().strip("\"'") for p in m.group(2).split(".")]
            if m.group(1) == "[[":
                name = ".".join(str(p) for p in parts)
                counters[name] = counters.get(name, -1) + 1
                parts.append(counters[name])
            table = parts
            if loc[: len(table)] == table:
                best = n
            continue
        if m := _KEY.match(raw):
            key: list[int | str] = [p.strip("\"'") for p in m.group(1).split(".")]
            full = table + key
            if loc[: len(full)] == full:
                return n
    return best

"""Every setting of the product, read once from the environment (and `.env`) and validated together.

This is the only module that reads the product's settings from `os.environ`; everything else gets a
`Settings` passed down. One variable is not ours: prometheus_client's PROMETHEUS_MULTIPROC_DIR, which
receiver/cli.py sets for `serve --processes` before prometheus_client is imported (it reads it then)
and receiver.metrics.receiver_registry looks up to find the same folder.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import urlparse

from receiver.destinations import (
    DELIVERY_CONCURRENCY,
    MAX_CONCURRENCY,
    MAX_IN_FLIGHT,
    MERCHANT,
    NAME_PATTERN,
    STREAM_MAXLEN,
    Breaker,
    Destination,
)
from receiver.errors import ConfigError
from receiver.keys import INTERGIRO_ENVIRONMENTS, TrustedKey, intergiro_key, load_public_key, split_key_list
from receiver.order import CREATED_EVENT, EVENT_TYPES, MAX_EVENTS, OrderLimits
from receiver.retries import DAY_SCHEDULE, attempts_of, parse_schedule
from receiver.status import STATUS_ORDER

VERIFY_MODES = ("local", "remote", "local-then-remote")
LOG_FORMATS = ("json", "console")
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"
    redis_key_prefix: str = "igr:"
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"
    redis_min_replicas: int = 0
    redis_timeout_seconds: float = 3.0
    receiver_host: str = "0.0.0.0"  # noqa: S104 - a receiver listens for the outside world
    receiver_port: int = 8080
    receiver_idle_timeout_seconds: float = 15.0
    receiver_body_timeout_seconds: float = 10.0
    intergiro_environment: str = "production"
    intergiro_public_keys: tuple[TrustedKey, ...] = ()
    intergiro_verify: str = "local"
    intergiro_api_url: str = "https://merchant.intergiro.com"
    intergiro_api_key: str = field(default="", repr=False)
    intergiro_api_timeout_seconds: float = 10.0
    intergiro_api_concurrency: int = 16
    dedup_ttl_seconds: int = 34_560_000
    queue_name: str = "order-updates"
    merchant_webhook_url: str = field(default="", repr=False)  # may hold Basic auth credentials
    merchant_webhook_secret: str = field(default="", repr=False)
    merchant_handler: str = ""
    delivery_max_attempts: int | None = None  # the schedule's attempts (receiver.retries.attempts_of)
    delivery_retry_schedule: tuple[float, ...] = DAY_SCHEDULE
    delivery_backoff_seconds: float | None = None
    delivery_timeout_seconds: float = 10.0
    breaker_failures: int = Breaker.failures
    breaker_probe_seconds: float = Breaker.probe_seconds
    breaker_max_probe_seconds: float = Breaker.max_probe_seconds
    delivery_concurrency: int = DELIVERY_CONCURRENCY
    merchant_max_in_flight: int = MAX_IN_FLIGHT
    merchant_tls_client_cert: str = ""
    merchant_tls_client_key: str = ""
    http_proxy: str = field(default="", repr=False)  # may hold the proxy's password
    https_proxy: str = field(default="", repr=False)
    no_proxy: str = ""
    max_body_bytes: int = 262_144
    max_callback_events: int = 200
    max_meta_bytes: int = 16_384
    max_customer_bytes: int = 4_096
    receiver_max_connections: int = 512
    history_retention_seconds: int = 2_592_000
    worker_metrics_port: int = 8082
    reconcile_interval_seconds: int = 0
    reconcile_lookback_seconds: int = 172_800
    replay_max_window_seconds: int = 691_200
    extra_destinations: tuple[Destination, ...] = ()  # DESTINATIONS and DESTINATION_<NAME>_*
    ops_host: str = "127.0.0.1"
    ops_port: int = 8081
    ops_token: str = field(default="", repr=False)
    ops_trust_forwarded_proto: bool = False
    log_format: str = "json"
    log_level: str = "INFO"
    # Traces (receiver/tracing.py): on when set; OpenTelemetry's other OTEL_* variables, as read here
    # (the process environment over `.env`), are handed to its SDK.
    otel_endpoint: str = ""
    otel_environment: tuple[tuple[str, str], ...] = ()

    @property
    def trusted_keys(self) -> tuple[TrustedKey, ...]:
        """Intergiro's key for the configured environment first, then the configured ones."""
        return (intergiro_key(self.intergiro_environment), *self.intergiro_public_keys)

    @property
    def expected_audience(self) -> str:
        return self.intergiro_environment

    @property
    def remote_verification(self) -> bool:
        """Whether any callback may be sent to Intergiro's verify endpoint."""
        return self.intergiro_verify != "local"

    @property
    def order_limits(self) -> OrderLimits:
        return OrderLimits(self.max_callback_events, self.max_meta_bytes, self.max_customer_bytes)

    @property
    def breaker(self) -> Breaker:
        return Breaker(self.breaker_failures, self.breaker_probe_seconds, self.breaker_max_probe_seconds)

    @property
    def merchant(self) -> Destination:
        """The `MERCHANT_*` settings as the destination `merchant`."""
        return Destination(
            MERCHANT, self.merchant_webhook_url, self.merchant_webhook_secret, self.merchant_handler,
            timeout_seconds=self.delivery_timeout_seconds,
            max_attempts=attempts_of(
                self.delivery_retry_schedule, self.delivery_backoff_seconds, self.delivery_max_attempts
            ),
            retry_schedule=self.delivery_retry_schedule, backoff_seconds=self.delivery_backoff_seconds,
            max_in_flight=self.merchant_max_in_flight,
            tls_client_cert=self.merchant_tls_client_cert,
            tls_client_key=self.merchant_tls_client_key, http_proxy=self.http_proxy,
            https_proxy=self.https_proxy, no_proxy=self.no_proxy,
        )  # fmt: skip

    @property
    def destinations(self) -> tuple[Destination, ...]:
        """Every destination updates are queued for: `merchant` first when MERCHANT_WEBHOOK_URL or
        MERCHANT_HANDLER is set, or when DESTINATIONS is empty (its queue is then the one a downstream
        service may consume itself, as without fan-out), then the DESTINATIONS in their order."""
        merchant = self.merchant
        if merchant.configured or not self.extra_destinations:
            return (merchant, *self.extra_destinations)
        return self.extra_destinations

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """What a process's start line says of its settings: no secret, token or credential (a URL's
        user and password, a webhook's URL), so that it may go to any log."""
        redis = urlparse(self.redis_url)
        return {
            "redis": f"{redis.scheme}://{redis.hostname or ''}:{redis.port or ''}{redis.path}",
            "redis_sentinels": len(self.redis_sentinels),
            "redis_min_replicas": self.redis_min_replicas,
            "key_prefix": self.redis_key_prefix,
            "queue": self.queue_name,
            "environment": self.intergiro_environment,
            "verify": self.intergiro_verify,
            "destinations": [d.name for d in self.destinations],
            "delivery_max_attempts": self.delivery_max_attempts,
            "delivery_timeout_seconds": self.delivery_timeout_seconds,
            "log_level": self.log_level,
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
        """Build and validate settings; raises ConfigError listing every bad variable."""
        return _Reader(read_environment(dotenv) if env is None else env).settings()


def read_environment(dotenv: bool = True) -> dict[str, str]:
    """The process environment over `.env` in the working directory (the environment wins)."""
    env = dict(os.environ)
    if dotenv and os.path.exists(".env"):
        from dotenv import dotenv_values

        env = {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **env}
    return env


class _Reader:
    """Reads variables, collecting one problem per bad one instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self.env.get(name, "").strip()
        if raw == "":
            return default
        try:
            return parse(raw)
        except (ValueError, OSError) as exc:
            self.problems.append(f"{name}: {exc}")
            return default

    def refused(self, name: str) -> bool:
        """Whether `name` was set to a bad value (its own line says why: "required" would be false)."""
        return any(problem.startswith(f"{name}: ") for problem in self.problems)

    def get_either(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        """`name`, or its lower-case spelling when `name` is unset (the proxy variables' custom)."""
        if self.env.get(name, "").strip() == "" and self.env.get(name.lower(), "").strip() != "":
            return self.get(name.lower(), default, parse)
        return self.get(name, default, parse)

    def settings(self) -> Settings:
        """Every setting read (the groups in the order their problems are listed), then the checks
        across settings."""
        d = Settings()
        s = Settings(
            **self._redis(d),
            **self._receiver(d),
            **self._intergiro(d),
            **self._delivery(d),
            **self._limits(d),
            **self._operations(d),
            **self._ops_console(d),
            **self._logs(d),
        )
        self.check_required_together(s)
        s = replace(s, extra_destinations=self.destinations(s))
        if self.problems:
            raise ConfigError(self.problems)
        return s

    def _redis(self, d: Settings) -> dict[str, Any]:
        """Where Redis is and how it is reached."""
        return {
            "redis_url": self.get("REDIS_URL", d.redis_url, _redis_url),
            "redis_key_prefix": self.get("REDIS_KEY_PREFIX", d.redis_key_prefix, _key_prefix),
            "redis_sentinels": self.get("REDIS_SENTINELS", d.redis_sentinels, _sentinels),
            "redis_sentinel_master": self.get("REDIS_SENTINEL_MASTER", d.redis_sentinel_master, _queue_name),
            "redis_min_replicas": self.get("REDIS_MIN_REPLICAS", d.redis_min_replicas, _int_between(0, 16)),
            "redis_timeout_seconds": self.get(
                "REDIS_TIMEOUT_SECONDS", d.redis_timeout_seconds, _float_between(0.1, 60.0)
            ),
        }

    def _receiver(self, d: Settings) -> dict[str, Any]:
        """Where the receiver listens, and how long it waits for a client."""
        return {
            "receiver_host": self.get("RECEIVER_HOST", d.receiver_host, str),
            "receiver_port": self.get("RECEIVER_PORT", d.receiver_port, _int_between(0, 65535)),
            "receiver_idle_timeout_seconds": self.get(
                "RECEIVER_IDLE_TIMEOUT_SECONDS", d.receiver_idle_timeout_seconds, _positive_float
            ),
            "receiver_body_timeout_seconds": self.get(
                "RECEIVER_BODY_TIMEOUT_SECONDS", d.receiver_body_timeout_seconds, _positive_float
            ),
        }

    def _intergiro(self, d: Settings) -> dict[str, Any]:
        """Intergiro: its environment and keys, how callbacks are verified, its API; how long a callback
        is remembered as seen."""
        return {
            "intergiro_environment": self.get(
                "INTERGIRO_ENVIRONMENT", d.intergiro_environment, _choice(INTERGIRO_ENVIRONMENTS)
            ),
            "intergiro_public_keys": self.get("INTERGIRO_PUBLIC_KEYS", d.intergiro_public_keys, _keys),
            "intergiro_verify": self.get("INTERGIRO_VERIFY", d.intergiro_verify, _choice(VERIFY_MODES)),
            "intergiro_api_url": self.get("INTERGIRO_API_URL", d.intergiro_api_url, _http_url),
            "intergiro_api_key": self.get("INTERGIRO_API_KEY", d.intergiro_api_key, str),
            "intergiro_api_timeout_seconds": self.get(
                "INTERGIRO_API_TIMEOUT_SECONDS", d.intergiro_api_timeout_seconds, _positive_float
            ),
            "intergiro_api_concurrency": self.get(
                "INTERGIRO_API_CONCURRENCY", d.intergiro_api_concurrency, _int_between(1, 1000)
            ),
            "dedup_ttl_seconds": self.get(
                "DEDUP_TTL_SECONDS", d.dedup_ttl_seconds, _int_between(1, 10 * 365 * 86400)
            ),
        }

    def _delivery(self, d: Settings) -> dict[str, Any]:
        """The queue and `merchant`'s delivery: its target, retries, breaker, concurrency, client
        certificate and proxies (the defaults of every destination)."""
        return {
            "queue_name": self.get("QUEUE_NAME", d.queue_name, _queue_name),
            "merchant_webhook_url": self.get("MERCHANT_WEBHOOK_URL", d.merchant_webhook_url, _http_url),
            "merchant_webhook_secret": self.get(
                "MERCHANT_WEBHOOK_SECRET", d.merchant_webhook_secret, _webhook_secret
            ),
            "merchant_handler": self.get("MERCHANT_HANDLER", d.merchant_handler, _handler_path),
            "delivery_max_attempts": self.get(
                "DELIVERY_MAX_ATTEMPTS", d.delivery_max_attempts, _int_between(1, 100)
            ),
            "delivery_retry_schedule": self.get(
                "DELIVERY_RETRY_SCHEDULE", d.delivery_retry_schedule, parse_schedule
            ),
            "delivery_backoff_seconds": self.get(
                "DELIVERY_BACKOFF_SECONDS", d.delivery_backoff_seconds, _nonnegative_float
            ),
            "delivery_timeout_seconds": self.get(
                "DELIVERY_TIMEOUT_SECONDS", d.delivery_timeout_seconds, _positive_float
            ),
            "breaker_failures": self.get("BREAKER_FAILURES", d.breaker_failures, _int_between(0, 100_000)),
            "breaker_probe_seconds": self.get(
                "BREAKER_PROBE_SECONDS", d.breaker_probe_seconds, _float_between(0.1, 3600.0)
            ),
            "breaker_max_probe_seconds": self.get(
                "BREAKER_MAX_PROBE_SECONDS", d.breaker_max_probe_seconds, _float_between(0.1, 3600.0)
            ),
            "delivery_concurrency": self.get(
                "DELIVERY_CONCURRENCY", d.delivery_concurrency, _int_between(1, MAX_CONCURRENCY)
            ),
            "merchant_max_in_flight": self.get(
                "MERCHANT_MAX_IN_FLIGHT", d.merchant_max_in_flight, _int_between(1, 100_000)
            ),
            "merchant_tls_client_cert": self.get(
                "MERCHANT_TLS_CLIENT_CERT", d.merchant_tls_client_cert, _pem_file("CERTIFICATE")
            ),
            "merchant_tls_client_key": self.get(
                "MERCHANT_TLS_CLIENT_KEY", d.merchant_tls_client_key, _pem_file("PRIVATE KEY")
            ),
            "http_proxy": self.get_either("HTTP_PROXY", d.http_proxy, _proxy_url),
            "https_proxy": self.get_either("HTTPS_PROXY", d.https_proxy, _proxy_url),
            "no_proxy": self.get_either("NO_PROXY", d.no_proxy, str),
        }

    def _limits(self, d: Settings) -> dict[str, Any]:
        """The bounds on what a client may send and on open connections."""
        return {
            "max_body_bytes": self.get(
                "MAX_BODY_BYTES", d.max_body_bytes, _int_between(1024, 64 * 1024 * 1024)
            ),
            "max_callback_events": self.get(
                "MAX_CALLBACK_EVENTS", d.max_callback_events, _int_between(1, MAX_EVENTS)
            ),
            "max_meta_bytes": self.get("MAX_META_BYTES", d.max_meta_bytes, _int_between(2, 16 * 1024 * 1024)),
            "max_customer_bytes": self.get(
                "MAX_CUSTOMER_BYTES", d.max_customer_bytes, _int_between(2, 16 * 1024 * 1024)
            ),
            "receiver_max_connections": self.get(
                "RECEIVER_MAX_CONNECTIONS", d.receiver_max_connections, _int_between(1, 100_000)
            ),
        }

    def _operations(self, d: Settings) -> dict[str, Any]:
        """How long histories are kept, the workers' metrics port, reconcile and replay."""
        return {
            "history_retention_seconds": self.get(
                "HISTORY_RETENTION_SECONDS", d.history_retention_seconds, _int_between(0, 400 * 86400)
            ),
            "worker_metrics_port": self.get(
                "WORKER_METRICS_PORT", d.worker_metrics_port, _int_between(0, 65535)
            ),
            "reconcile_interval_seconds": self.get(
                "RECONCILE_INTERVAL_SECONDS", d.reconcile_interval_seconds, _int_between(0, 86400 * 7)
            ),
            "reconcile_lookback_seconds": self.get(
                "RECONCILE_LOOKBACK_SECONDS", d.reconcile_lookback_seconds, _int_between(60, 86400 * 400)
            ),
            "replay_max_window_seconds": self.get(
                "REPLAY_MAX_WINDOW_SECONDS", d.replay_max_window_seconds, _int_between(3600, 86400 * 400)
            ),
        }

    def _ops_console(self, d: Settings) -> dict[str, Any]:
        """The ops console."""
        return {
            "ops_host": self.get("OPS_HOST", d.ops_host, str),
            "ops_port": self.get("OPS_PORT", d.ops_port, _int_between(1, 65535)),
            "ops_token": self.get("OPS_TOKEN", d.ops_token, _ops_token),
            "ops_trust_forwarded_proto": self.get(
                "OPS_TRUST_FORWARDED_PROTO", d.ops_trust_forwarded_proto, _yes_or_no
            ),
        }

    def _logs(self, d: Settings) -> dict[str, Any]:
        """The log lines' format and level; traces (OpenTelemetry's OTEL_* variables, handed to its SDK)."""
        return {
            "log_format": self.get("LOG_FORMAT", d.log_format, _choice(LOG_FORMATS)),
            "log_level": self.get("LOG_LEVEL", d.log_level, _log_level),
            "otel_endpoint": self.get("OTEL_EXPORTER_OTLP_ENDPOINT", d.otel_endpoint, _otlp_endpoint),
            "otel_environment": tuple(sorted((k, v) for k, v in self.env.items() if k.startswith("OTEL_"))),
        }

    def check_required_together(self, s: Settings) -> None:
        """Settings that need another: the API key for remote verification, the webhook's secret, both
        halves of the client certificate."""
        if s.remote_verification and not s.intergiro_api_key and not self.refused("INTERGIRO_API_KEY"):
            self.problems.append(f"INTERGIRO_API_KEY: required when INTERGIRO_VERIFY={s.intergiro_verify}")
        if (
            s.merchant_webhook_url
            and not s.merchant_webhook_secret
            and not self.refused("MERCHANT_WEBHOOK_SECRET")
        ):
            self.problems.append("MERCHANT_WEBHOOK_SECRET: required when MERCHANT_WEBHOOK_URL is set")
        self.check_client_certificate(
            "MERCHANT_TLS_CLIENT_", s.merchant_tls_client_cert, s.merchant_tls_client_key
        )

    def destinations(self, s: Settings) -> tuple[Destination, ...]:
        """DESTINATIONS, each from its DESTINATION_<NAME>_* variables (delivery settings default to the
        DELIVERY_* ones, proxies to the global ones)."""
        names: tuple[str, ...] = self.get("DESTINATIONS", (), _destination_names)
        found: list[Destination] = []
        for name in names:
            p = f"DESTINATION_{name.upper().replace('-', '_')}_"
            schedule = self.get(p + "RETRY_SCHEDULE", s.delivery_retry_schedule, parse_schedule)
            backoff = self.get(p + "BACKOFF_SECONDS", s.delivery_backoff_seconds, _nonnegative_float)
            attempts = self.get(p + "MAX_ATTEMPTS", s.delivery_max_attempts, _int_between(1, 100))
            destination = Destination(
                name,
                url=self.get(p + "URL", "", _http_url),
                secret=self.get(p + "SECRET", "", _webhook_secret),
                handler=self.get(p + "HANDLER", "", _handler_path),
                stream=self.get(p + "STREAM", "", _stream_key),
                stream_maxlen=self.get(p + "STREAM_MAXLEN", STREAM_MAXLEN, _int_between(100, 1_000_000_000)),
                events=self.get(p + "EVENTS", frozenset(), _names_of("event type", (*EVENT_TYPES, CREATED_EVENT))),
                statuses=self.get(p + "STATUSES", frozenset(), _names_of("status", STATUS_ORDER)),
                timeout_seconds=self.get(p + "TIMEOUT_SECONDS", s.delivery_timeout_seconds, _positive_float),
                max_attempts=attempts_of(schedule, backoff, attempts),
                retry_schedule=schedule,
                backoff_seconds=backoff,
                max_in_flight=self.get(p + "MAX_IN_FLIGHT", MAX_IN_FLIGHT, _int_between(1, 100_000)),
                tls_client_cert=self.get(p + "TLS_CLIENT_CERT", "", _pem_file("CERTIFICATE")),
                tls_client_key=self.get(p + "TLS_CLIENT_KEY", "", _pem_file("PRIVATE KEY")),
                http_proxy=self.get(p + "HTTP_PROXY", s.http_proxy, _proxy_url),
                https_proxy=self.get(p + "HTTPS_PROXY", s.https_proxy, _proxy_url),
                no_proxy=self.get(p + "NO_PROXY", s.no_proxy, str),
            )  # fmt: skip
            if not any(problem.startswith(p) for problem in self.problems):
                if not destination.configured:
                    self.problems.append(
                        f"{p}URL: required (or {p}HANDLER, or {p}STREAM) for the destination {name}"
                    )
                elif destination.stream and (destination.url or destination.handler):
                    self.problems.append(f"{p}STREAM: a stream destination has no URL or HANDLER of its own")
                elif destination.url and not destination.secret:
                    self.problems.append(f"{p}SECRET: required when {p}URL is set")
            self.check_client_certificate(
                p + "TLS_CLIENT_", destination.tls_client_cert, destination.tls_client_key
            )
            found.append(destination)
        known = {
            p + v
            for p in (f"DESTINATION_{n.upper().replace('-', '_')}_" for n in names)
            for v in DESTINATION_VARIABLES
        }
        for stray in (
            []
            if any(x.startswith("DESTINATIONS:") for x in self.problems)
            else sorted(n for n in self.env if n.startswith("DESTINATION_") and n not in known)
        ):
            self.problems.append(f"{stray}: not a setting of any destination in DESTINATIONS")
        return tuple(found)

    def check_client_certificate(self, prefix: str, cert: str, key: str) -> None:
        """Both or neither of the client certificate and key (`<prefix>CERT`, `<prefix>KEY`), and a key
        that belongs to the certificate."""
        if any(p.startswith(prefix) for p in self.problems):
            return  # a file already refused: its own line says why
        if bool(cert) != bool(key):
            missing, given = (prefix + "KEY", prefix + "CERT") if cert else (prefix + "CERT", prefix + "KEY")
            self.problems.append(f"{missing}: required when {given} is set")
        elif cert and key:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                self.problems.append(
                    f"{prefix}KEY: not the key of {prefix}CERT, or encrypted "
                    f"(use an unencrypted PEM key): {getattr(exc, 'reason', None) or exc}"
                )


class _NameRecorder(dict[str, str]):
    """An empty environment that remembers which variables were asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def get(self, name: str, default: Any = None) -> Any:
        self.names.append(name)
        return default


def _setting_names() -> tuple[str, ...]:
    recorder = _NameRecorder()
    _Reader(recorder).settings()
    # The lower-case spellings of the proxy variables are accepted, not documented.
    return tuple(dict.fromkeys(n for n in recorder.names if n.isupper()))


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{raw!r} is not a finite number")
    return value


def _float_between(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _float(raw)
        if not low <= value <= high:
            raise ValueError(f"{value:g} is outside {low:g}..{high:g}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    value = _float(raw)
    if value <= 0:
        raise ValueError(f"{raw!r} must be greater than 0")
    return value


def _nonnegative_float(raw: str) -> float:
    value = _float(raw)
    if value < 0:
        raise ValueError(f"{raw!r} must not be negative")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return raw

    return parse


def _redis_url(raw: str) -> str:
    if urlparse(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw


def _sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` of the Redis Sentinels that know the master."""
    result = []
    for part in (p.strip() for p in raw.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not host:port")
        result.append((host.strip("[]"), int(port)))
    return tuple(result)


def _http_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")


def _otlp_endpoint(raw: str) -> str:
    url = _http_url(raw)
    try:
        urlparse(url).port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError:
        raise ValueError(f"bad port in {urlparse(url).hostname}'s URL") from None
    return url


def _pem_file(label: str) -> Callable[[str], str]:
    """A readable PEM file holding a `-----BEGIN ...{label}-----` block."""

    def parse(raw: str) -> str:
        try:
            with open(raw, "rb") as file:
                text = file.read(1_000_000)
        except OSError as exc:
            raise ValueError(f"cannot read {raw} ({exc.strerror})") from None
        if not re.search(rb"-----BEGIN [A-Z ]*" + label.encode() + rb"-----", text):
            raise ValueError(f"{raw} holds no PEM {label.lower()}")
        return raw

    return parse


def _proxy_url(raw: str) -> str:
    """http(s)://[user:password@]host[:port]; a bare host:port means http://."""
    url = raw if "://" in raw else f"http://{raw}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"{parsed.scheme}:// proxies are not supported (use http:// or https://)")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("bad port") from None
    if not parsed.hostname:
        raise ValueError("must be http://host:port or https://host:port")
    return url


def _key_prefix(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:{}-]{1,64}", raw):
        raise ValueError("use letters, digits and _ . : { } - (at most 64)")
    return raw


def _queue_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", raw):
        raise ValueError("use letters, digits and _ . - (at most 100)")
    return raw


def _webhook_secret(raw: str) -> str:
    import base64
    import binascii

    body = raw.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("must be a Standard Webhooks secret: whsec_ followed by base64") from None
    if len(decoded) < 24:
        raise ValueError("secret is too short (24 bytes at least)")
    return raw


# What DESTINATION_<NAME>_ is followed by (a variable of a name not in DESTINATIONS, or misspelt, stops
# the process: a destination left unconfigured by a typo must not go unnoticed).
DESTINATION_VARIABLES = (
    "URL", "SECRET", "HANDLER", "EVENTS", "STATUSES", "TIMEOUT_SECONDS", "MAX_ATTEMPTS", "BACKOFF_SECONDS",
    "RETRY_SCHEDULE", "MAX_IN_FLIGHT", "STREAM", "STREAM_MAXLEN",
    "TLS_CLIENT_CERT", "TLS_CLIENT_KEY", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
)  # fmt: skip


def _destination_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(","))
    for name in names:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"{name!r} is not a destination name (a-z, 0-9 and -, at most 40)")
        if name == MERCHANT:
            raise ValueError("merchant is the MERCHANT_* settings' destination; name the others differently")
    if len(set(names)) != len(names):
        raise ValueError("a destination is named twice")
    return names


def _names_of(what: str, allowed: tuple[str, ...]) -> Callable[[str], frozenset[str]]:
    """A comma-separated list of names, each one of `allowed`."""

    def parse(raw: str) -> frozenset[str]:
        names = [n.strip() for n in raw.split(",") if n.strip()]
        for name in names:
            if name not in allowed:
                raise ValueError(
                    f"{name!r} is not a{'n' if what[0] in 'aeiou' else ''} {what} ({', '.join(sorted(allowed))})"
                )
        return frozenset(names)

    return parse


def _stream_key(raw: str) -> str:
    if not re.fullmatch(r"[\w.:{}-]{1,200}", raw):
        raise ValueError("must be a Redis key of letters, digits and _ . : - { } (at most 200)")
    return raw


def _handler_path(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", raw):
        raise ValueError("must be module:function")
    return raw


def _keys(raw: str) -> tuple[TrustedKey, ...]:
    try:
        parts = split_key_list(raw)
    except OSError as exc:
        raise ValueError(f"cannot read key file ({exc.strerror})") from None
    keys = []
    for number, part in enumerate(parts, start=1):
        try:
            keys.append(load_public_key(part))
        except ValueError as exc:
            raise ValueError(f"key {number}: {exc}") from None
    return tuple(keys)


OPS_TOKEN_MIN_CHARS = 32


def _yes_or_no(raw: str) -> bool:
    answer = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(raw.lower())
    if answer is None:
        raise ValueError(f"use true or false, not {raw!r}")
    return answer


def _ops_token(raw: str) -> str:
    if len(raw) < OPS_TOKEN_MIN_CHARS:
        raise ValueError(f"must be at least {OPS_TOKEN_MIN_CHARS} characters (it is {len(raw)})")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{raw!r} is not DEBUG, INFO, WARNING or ERROR")
    return level


# Every environment variable the settings read, in reading order (deploy files and .env.example
# are checked against it).
SETTING_NAMES: tuple[str, ...] = _setting_names()

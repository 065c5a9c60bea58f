"""Bad configuration stops the process at start with one line per problem, naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from receiver.errors import ConfigError
from receiver.settings import Settings
from tests.certificates import TestCA


def test_defaults_are_the_contracts() -> None:
    s = Settings.from_env({})
    assert (s.redis_url, s.receiver_port, s.intergiro_environment, s.intergiro_verify) == (
        "redis://localhost:6379/0",
        8080,
        "production",
        "local",
    )
    assert (s.dedup_ttl_seconds, s.queue_name, s.merchant.max_attempts, s.max_body_bytes) == (
        34560000,
        "order-updates",
        10,
        262144,
    )
    assert [k.name for k in s.trusted_keys] == ["intergiro-production"]


@pytest.mark.parametrize(
    ("env", "variable"),
    [({"RECEIVER_PORT": "eighty"}, "RECEIVER_PORT"), ({"INTERGIRO_ENVIRONMENT": "staging"}, "INTERGIRO_ENVIRONMENT"),
     ({"INTERGIRO_VERIFY": "remote"}, "INTERGIRO_API_KEY"), ({"INTERGIRO_PUBLIC_KEYS": "bm90IGEga2V5"}, "INTERGIRO_PUBLIC_KEYS"),
     ({"DEDUP_TTL_SECONDS": "-1"}, "DEDUP_TTL_SECONDS"), ({"MAX_BODY_BYTES": "1e9"}, "MAX_BODY_BYTES"),
     ({"REDIS_URL": "http://x"}, "REDIS_URL"), ({"MERCHANT_WEBHOOK_URL": "http://m/x"}, "MERCHANT_WEBHOOK_SECRET"),
     ({"MERCHANT_WEBHOOK_SECRET": "plain"}, "MERCHANT_WEBHOOK_SECRET"), ({"MERCHANT_HANDLER": "nocolon"}, "MERCHANT_HANDLER"),
     ({"DELIVERY_BACKOFF_SECONDS": "nan"}, "DELIVERY_BACKOFF_SECONDS"), ({"INTERGIRO_PUBLIC_KEYS": "@/no/such/file"}, "INTERGIRO_PUBLIC_KEYS"),
     ({"INTERGIRO_API_CONCURRENCY": "0"}, "INTERGIRO_API_CONCURRENCY"), ({"INTERGIRO_API_CONCURRENCY": "many"}, "INTERGIRO_API_CONCURRENCY")],
)  # fmt: skip
def test_a_bad_value_is_named(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert [p.split(":")[0] for p in caught.value.problems] == [variable]


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RECEIVER_PORT": "x", "QUEUE_NAME": "a b", "LOG_LEVEL": "loud"})
    assert len(caught.value.problems) == 3


def test_secrets_do_not_show_in_the_settings_repr() -> None:
    s = Settings.from_env({"INTERGIRO_VERIFY": "remote", "INTERGIRO_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)


def test_serve_with_a_bad_setting_exits_1_with_one_line_per_problem(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "serve"],
        env={"RECEIVER_PORT": "x", "INTERGIRO_VERIFY": "sometimes", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "RECEIVER_PORT" in lines[0] and "INTERGIRO_VERIFY" in lines[1]


@pytest.fixture
def client_pair(tmp_path: Path) -> tuple[Path, Path]:
    issued = TestCA(tmp_path).issue("worker", client=True)
    return issued.cert, issued.key


def test_a_client_certificate_and_its_key_are_taken_together(client_pair: tuple[Path, Path]) -> None:
    cert, key = client_pair
    s = Settings.from_env({"MERCHANT_TLS_CLIENT_CERT": str(cert), "MERCHANT_TLS_CLIENT_KEY": str(key)})
    assert (s.merchant_tls_client_cert, s.merchant_tls_client_key) == (str(cert), str(key))


def bad_client_certificates(cert: Path, key: Path, tmp_path: Path) -> list[tuple[dict[str, str], str]]:
    other = TestCA(tmp_path, "Other CA").issue("someone else", client=True)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    unreadable = tmp_path / "unreadable.pem"
    unreadable.mkdir()
    return [
        ({"MERCHANT_TLS_CLIENT_CERT": str(cert)}, "MERCHANT_TLS_CLIENT_KEY: required when"),
        ({"MERCHANT_TLS_CLIENT_KEY": str(key)}, "MERCHANT_TLS_CLIENT_CERT: required when"),
        ({"MERCHANT_TLS_CLIENT_CERT": "/no/such.pem", "MERCHANT_TLS_CLIENT_KEY": str(key)},
         "MERCHANT_TLS_CLIENT_CERT: cannot read /no/such.pem"),
        ({"MERCHANT_TLS_CLIENT_CERT": str(unreadable), "MERCHANT_TLS_CLIENT_KEY": str(key)},
         "MERCHANT_TLS_CLIENT_CERT: cannot read"),
        ({"MERCHANT_TLS_CLIENT_CERT": str(key), "MERCHANT_TLS_CLIENT_KEY": str(key)},
         "MERCHANT_TLS_CLIENT_CERT: " + str(key) + " holds no PEM certificate"),
        ({"MERCHANT_TLS_CLIENT_CERT": str(cert), "MERCHANT_TLS_CLIENT_KEY": str(cert)},
         "MERCHANT_TLS_CLIENT_KEY: " + str(cert) + " holds no PEM private key"),
        ({"MERCHANT_TLS_CLIENT_CERT": str(cert), "MERCHANT_TLS_CLIENT_KEY": str(other.key)},
         "MERCHANT_TLS_CLIENT_KEY: not the key of MERCHANT_TLS_CLIENT_CERT"),
        ({"MERCHANT_TLS_CLIENT_CERT": str(cert), "MERCHANT_TLS_CLIENT_KEY": str(encrypted)},
         "MERCHANT_TLS_CLIENT_KEY: not the key of MERCHANT_TLS_CLIENT_CERT, or encrypted"),
    ]  # fmt: skip


def test_a_bad_missing_or_unpaired_client_certificate_is_one_problem_naming_its_variable(
    client_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    for env, problem in bad_client_certificates(*client_pair, tmp_path):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(env)
        assert len(caught.value.problems) == 1, (env, caught.value.problems)
        assert caught.value.problems[0].startswith(problem), (env, caught.value.problems)


def test_worker_with_only_a_client_key_exits_1_with_one_line(
    client_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "receiver", "worker", "--burst"],
        env={"MERCHANT_TLS_CLIENT_KEY": str(client_pair[1]), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "MERCHANT_TLS_CLIENT_CERT: required when MERCHANT_TLS_CLIENT_KEY is set" in line


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"HTTPS_PROXY": "http://proxy.test:3128"}, ("", "http://proxy.test:3128", "")),
     ({"HTTP_PROXY": "proxy.test:3128", "NO_PROXY": "localhost"}, ("http://proxy.test:3128", "", "localhost")),
     ({"https_proxy": "https://proxy.test", "no_proxy": "*"}, ("", "https://proxy.test", "*")),
     ({"HTTPS_PROXY": "http://upper.test", "https_proxy": "http://lower.test"}, ("", "http://upper.test", ""))],
)  # fmt: skip
def test_the_proxy_variables_are_read_in_either_case(
    env: dict[str, str], expected: tuple[str, str, str]
) -> None:
    s = Settings.from_env(env)
    assert (s.http_proxy, s.https_proxy, s.no_proxy) == expected


@pytest.mark.parametrize(
    ("env", "problem"),
    [({"HTTPS_PROXY": "socks5://proxy.test:1080"}, "HTTPS_PROXY: socks5:// proxies are not supported"),
     ({"HTTP_PROXY": "http://proxy.test:port"}, "HTTP_PROXY: bad port"),
     ({"https_proxy": "http://:3128"}, "https_proxy: must be http://host:port")],
)  # fmt: skip
def test_a_bad_proxy_url_is_named_and_its_password_not_shown(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.problems == [problem] or caught.value.problems[0].startswith(problem)


def test_proxy_passwords_do_not_show_in_the_settings_repr() -> None:
    s = Settings.from_env({"HTTPS_PROXY": "http://relay:hunter2@proxy.test:3128"})
    assert "hunter2" not in repr(s)


HANDLER = {"DESTINATIONS": "erp", "DESTINATION_ERP_HANDLER": "tests.merchant_handlers:books"}


@pytest.mark.parametrize(
    ("env", "variable"),
    [({"DESTINATIONS": "ERP"}, "DESTINATIONS"), ({"DESTINATIONS": "merchant"}, "DESTINATIONS"),
     ({"DESTINATIONS": "erp,erp"}, "DESTINATIONS"), ({"DESTINATIONS": "erp"}, "DESTINATION_ERP_URL"),
     ({"DESTINATIONS": "erp", "DESTINATION_ERP_URL": "http://erp/x"}, "DESTINATION_ERP_SECRET"),
     ({**HANDLER, "DESTINATION_ERP_URL": "ftp://erp"}, "DESTINATION_ERP_URL"),
     ({**HANDLER, "DESTINATION_ERP_SECRET": "plain"}, "DESTINATION_ERP_SECRET"),
     ({"DESTINATIONS": "erp", "DESTINATION_ERP_HANDLER": "nocolon"}, "DESTINATION_ERP_HANDLER"),
     ({**HANDLER, "DESTINATION_ERP_EVENTS": "charged"}, "DESTINATION_ERP_EVENTS"),
     ({**HANDLER, "DESTINATION_ERP_STATUSES": "charge"}, "DESTINATION_ERP_STATUSES"),
     ({**HANDLER, "DESTINATION_ERP_TIMEOUT_SECONDS": "0"}, "DESTINATION_ERP_TIMEOUT_SECONDS"),
     ({**HANDLER, "DESTINATION_ERP_MAX_ATTEMPTS": "0"}, "DESTINATION_ERP_MAX_ATTEMPTS"),
     ({**HANDLER, "DESTINATION_ERP_BACKOFF_SECONDS": "-1"}, "DESTINATION_ERP_BACKOFF_SECONDS"),
     ({**HANDLER, "DESTINATION_ERP_TLS_CLIENT_CERT": "/no/such.pem"}, "DESTINATION_ERP_TLS_CLIENT_CERT"),
     ({**HANDLER, "DESTINATION_ERP_HTTPS_PROXY": "socks5://p:1"}, "DESTINATION_ERP_HTTPS_PROXY"),
     ({**HANDLER, "DESTINATION_ERP_TIMEOUT": "3"}, "DESTINATION_ERP_TIMEOUT"),
     ({**HANDLER, "DESTINATION_ERPP_URL": "http://erp/x"}, "DESTINATION_ERPP_URL")],
)  # fmt: skip
def test_a_bad_destination_value_is_named(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert [p.split(":")[0] for p in caught.value.problems] == [variable]


def test_destinations_come_after_merchant_with_their_filters_and_merchant_only_when_configured() -> None:
    env = {**HANDLER, "DESTINATION_ERP_EVENTS": "charge, refund", "DESTINATION_ERP_STATUSES": "charged"}
    s = Settings.from_env(env)
    [erp] = s.destinations
    assert (erp.name, erp.events, erp.statuses, erp.timeout_seconds) == (
        "erp",
        {"charge", "refund"},
        {"charged"},
        10.0,
    )
    with_merchant = Settings.from_env({**env, "MERCHANT_HANDLER": "tests.merchant_handlers:takes"})
    assert [d.name for d in with_merchant.destinations] == ["merchant", "erp"]
    assert [d.name for d in Settings.from_env({}).destinations] == ["merchant"]  # as before fan-out

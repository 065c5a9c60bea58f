"""Bad configuration stops the process at start with one line per problem, naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from receiver.errors import ConfigError
from receiver.settings import Settings


def test_defaults_are_the_contracts() -> None:
    s = Settings.from_env({})
    assert (s.redis_url, s.receiver_port, s.intergiro_environment, s.intergiro_verify) == (
        "redis://localhost:6379/0",
        8080,
        "production",
        "local",
    )
    assert (s.dedup_ttl_seconds, s.queue_name, s.delivery_max_attempts, s.max_body_bytes) == (
        34560000,
        "order-updates",
        8,
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

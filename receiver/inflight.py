"""The bound on one destination's requests in flight, across every worker process and host
(MERCHANT_MAX_IN_FLIGHT, DESTINATION_<NAME>_MAX_IN_FLIGHT): leases in one Redis sorted set.

A worker process takes a lease before it takes a job off the destination's queue, so a delivery waiting
for a slot is still on the queue: not started, not an attempt, and first in line (the queue's order)
when a slot frees. The process keeps the lease for its next job while its queue has work (taking and
returning one per delivery would cost two more disk flushes each), and returns the leases it does not
use when its queue is found empty or it stops. A lease lapses LAPSE_SECONDS after it was last renewed,
so the leases of a process killed with SIGKILL come back by themselves; live processes renew theirs
every RENEW_SECONDS. Times are Redis' own clock (TIME), one clock for every host.

The leases belong to the process, not to one run of RQ's loop: when a Redis error ends the loop (a
restart, a failover) the leases it could not return are kept for the next loop, which renews them
before it uses any: those Redis still holds are used, those it lost (or let lapse) are dropped.
Leases dropped instead would hold their slots until they lapsed, and with every process's leases so
stranded the destination got nothing for up to LAPSE_SECONDS after a Redis blip of a second.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from receiver.logs import log

LAPSE_SECONDS = 30.0
RENEW_SECONDS = 5.0
# How soon a process that found every slot taken asks again (doubling up to the ceiling).
POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.1

# KEYS[1]: the leases. ARGV[1]: the bound, ARGV[2]: the leases' lapse (ms), ARGV[3..]: new leases' tokens.
# One step: drop lapsed leases, count the live ones, add as many of the tokens (in order) as there is
# room for. Returns how many were added.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local added = 0
for i = 3, #ARGV do
  if added >= room then break end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  added = added + 1
end
if added > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return added
"""

# KEYS[1]: the leases. ARGV[1]: the lapse (ms), ARGV[2..]: the tokens a process holds.
# Returns the tokens it no longer holds (lapsed and dropped meanwhile: it must not use them again).
RENEW = """
local t = redis.call('TIME')
local lapse = tonumber(ARGV[1])
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + lapse, ARGV[i])
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    lost[#lost + 1] = ARGV[i]
  end
end
redis.call('PEXPIRE', KEYS[1], lapse)
return lost
"""


class InFlightLeases:
    """One process's leases on one destination's slots: `take` before a job is taken off the queue,
    `give_back` once its delivery ended (kept for the next), `return_spare` when the queue is empty."""

    def __init__(self, redis: Redis, key: str, bound: int) -> None:
        self.redis = redis
        self.key = key
        self.bound = bound
        self.prefix = uuid.uuid4().hex[:12]
        self.spare: list[str] = []  # held, not in use
        self.in_use: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._count = 0
        self._renewer: threading.Thread | None = None
        self.unconfirmed = False  # kept through a Redis outage: renewed (or dropped) before any is used

    def take(self, give_up: Callable[[], bool] = lambda: False) -> str | None:
        """A lease, waiting while every slot is taken (None once `give_up()` says so)."""
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_loop, name="in-flight-leases", daemon=True)
            self._renewer.start()
        pause = POLL_SECONDS
        while not give_up():
            taken = self.take_more(1)  # one of ours freed by a delivery that ended, or a new one
            if taken:
                return taken[0]
            self.stopping.wait(pause)
            pause = min(pause * 2, MAX_POLL_SECONDS)
        return None

    def take_more(self, count: int) -> list[str]:
        """Up to `count` leases, without waiting: the spare ones, then as many new ones as the bound
        leaves room for (one round trip). For a worker that takes several jobs at once. Leases kept
        through a Redis outage are confirmed first: Redis may have lost them (no append-only file, a
        failover) or let them lapse, and others may hold their slots by now."""
        if self.unconfirmed:
            self.renew()
            self.unconfirmed = False
        with self.lock:
            taken, self.spare = self.spare[:count], self.spare[count:]
            self.in_use.update(taken)
        if len(taken) < count:
            taken += self._acquire_new(count - len(taken))
        return taken

    def _acquire_new(self, count: int) -> list[str]:
        """New leases, as many of `count` as the bound leaves room for; held from here on."""
        with self.lock:
            tokens = [f"{self.prefix}-{self._count + n + 1}" for n in range(count)]
            self._count += count
        added = int(self._acquire(keys=[self.key], args=[self.bound, int(LAPSE_SECONDS * 1000), *tokens]))
        with self.lock:
            self.in_use.update(tokens[:added])
        return tokens[:added]

    def give_back(self, token: str | None) -> None:
        """The delivery that held `token` ended: keep the lease for the next one."""
        if token is None:
            return
        with self.lock:
            if token in self.in_use:
                self.in_use.discard(token)
                self.spare.append(token)

    def return_spare(self, keep: int = 0) -> None:
        """Return the leases no delivery uses (the queue was empty, or the process stops), but `keep`
        (the one its next wait for a job takes again a second later)."""
        with self.lock:
            spare, self.spare = self.spare[keep:], self.spare[:keep]
        if not spare:
            return
        try:
            self.redis.zrem(self.key, *spare)
        except RedisError:  # still held: kept, to be used or returned later
            with self.lock:
                self.spare += spare
            raise

    def return_all(self) -> None:
        """Return every lease held, in use or not (their deliveries ended); on a Redis error they are
        kept, spare."""
        with self.lock:
            self.spare += list(self.in_use)
            self.in_use = set()
        self.return_spare()

    def end_loop(self) -> None:
        """The worker's loop ended, its deliveries with it: return every lease held. When Redis is out
        of reach they are kept (spare, renewed) for the next loop rather than left to lapse."""
        try:
            self.return_all()
        except RedisError as exc:
            with self.lock:
                count = len(self.spare)
                self.unconfirmed = True
            log.warning(
                "in-flight leases kept for the next loop: Redis out of reach", count=count, error=str(exc)
            )

    def renew(self) -> None:
        """Extend every lease held; forget the ones that lapsed meanwhile (Redis was out of reach)."""
        with self.lock:
            held = [*self.spare, *self.in_use]
        if not held:
            return
        lost = {t.decode() for t in self._renew(keys=[self.key], args=[int(LAPSE_SECONDS * 1000), *held])}
        if lost:
            with self.lock:
                self.spare = [t for t in self.spare if t not in lost]
                self.in_use -= lost
            log.warning("in-flight leases lapsed and were dropped", count=len(lost))

    def _renew_loop(self) -> None:
        while not self.stopping.wait(RENEW_SECONDS):
            try:
                self.renew()
            except RedisError as exc:
                log.warning("could not renew in-flight leases", error=str(exc))

    def stop(self) -> None:
        """Stop renewing and return every lease still held."""
        self.stopping.set()
        try:
            self.return_all()
        except RedisError as exc:  # they lapse by themselves
            log.warning("could not return in-flight leases", error=str(exc))

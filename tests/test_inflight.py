"""The per-destination bound's leases (receiver/inflight.py) through a Redis outage, on real Redis servers
stopped and started again: leases a worker kept because it could not return them are confirmed before
they are used, so the bound holds whether Redis kept them or lost them."""

from __future__ import annotations

import redis

from receiver.inflight import InFlightLeases
from tests.processes import RedisServer

KEY = "igr:in-flight"


def held_through_an_outage(server: RedisServer, bound: int) -> tuple[InFlightLeases, list[str], redis.Redis]:
    """A process's leases on every slot, its loop ended while Redis was down (so it kept them), and
    Redis started again."""
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    leases = InFlightLeases(client, KEY, bound)
    held = leases.take_more(bound)
    assert len(held) == bound
    for token in held:
        leases.give_back(token)  # their deliveries ended
    server.stop()
    leases.end_loop()  # Redis out of reach: kept, not returned
    server.start()
    return leases, held, client


def test_leases_a_redis_restart_lost_are_dropped_not_used_so_the_bound_holds(own_redis: RedisServer) -> None:
    leases, _, client = held_through_an_outage(own_redis, bound=2)  # no append-only file: Redis forgot them
    other = InFlightLeases(client, KEY, 2)  # another worker process finds the slots free, and takes them
    assert len(other.take_more(2)) == 2
    assert leases.take_more(1) == []  # ours were lost: not one of them is used
    assert client.zcard(KEY) == 2
    client.close()


def test_leases_redis_kept_through_a_restart_are_used_again(restartable_redis: RedisServer) -> None:
    leases, held, client = held_through_an_outage(restartable_redis, bound=2)  # append-only: it kept them
    assert sorted(leases.take_more(2)) == sorted(held)  # the same slots, nothing new acquired
    assert InFlightLeases(client, KEY, 2).take_more(1) == []  # still held: no room for another process
    assert client.zcard(KEY) == 2
    client.close()

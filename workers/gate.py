"""The gate a worker passes before it takes a job off its destination's queue (receiver/destination_state.py):
shut while the destination is paused; while it is down, open for one probe at a time deployment-wide, on
the breaker's backoff. Updates held meanwhile wait on the queue, in sequence, and spend no attempts."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

from receiver.destination_state import DOWN, UP, DestinationState
from receiver.logs import log

POLL_SECONDS = 0.5  # how often a held worker looks again (the state it reads is at most a second old)
DELIVER, PROBE = "deliver", "probe"


class DeliveryGate:
    def __init__(self, state: DestinationState, probe_lease_seconds: float = 30.0) -> None:
        self.state = state
        self.probe_lease_seconds = probe_lease_seconds  # one attempt's time: a probe lost lapses then
        self.held = False  # whether the last pass had to wait: logged once per hold
        self.stopping = threading.Event()
        self.prefix = uuid.uuid4().hex[:12]
        self.probes = 0
        self.probe_token: str | None = None  # the last probe granted

    def pass_through(self, give_up: Callable[[], bool], waiting: Callable[[], None]) -> str | None:
        """DELIVER when the destination is up, PROBE when this worker may send the down destination's
        probe; meanwhile waits, calling `waiting()` (the worker's heartbeat). None once `give_up()`."""
        while not give_up():
            view = self.state.current()
            if view.state == UP:
                self.held = False
                return DELIVER
            if view.state == DOWN:
                self.probes += 1
                token = f"{self.prefix}-{self.probes}"
                granted = self.state.try_probe(token, self.probe_lease_seconds)
                if granted == 1:
                    self.probe_token = token
                    return PROBE
                if granted == 2:
                    self.state.read()
                    continue
            if not self.held:
                self.held = True
                log.info("deliveries held", destination=view.destination, state=view.state)
            waiting()
            self.stopping.wait(POLL_SECONDS)
        return None

    def probe_unused(self) -> None:
        """The probe granted last took no job: give its place back rather than let it lapse."""
        if self.probe_token is not None:
            self.state.release_probe(self.probe_token)
            self.probe_token = None

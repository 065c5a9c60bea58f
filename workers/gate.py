"""The gate a worker passes before it takes a job off its destination's queue: shut while the destination
is paused (receiver/destination_state.py), so its updates wait on the queue, in sequence, and spend no
attempts."""

from __future__ import annotations

import threading
from collections.abc import Callable

from receiver.destination_state import UP, DestinationState
from receiver.logs import log

POLL_SECONDS = 0.5  # how often a held worker looks again (the state it reads is at most a second old)


class DeliveryGate:
    def __init__(self, state: DestinationState) -> None:
        self.state = state
        self.held = False  # whether the last pass had to wait: logged once per hold
        self.stopping = threading.Event()

    def pass_through(self, give_up: Callable[[], bool], waiting: Callable[[], None]) -> bool:
        """Wait while the destination is not up, calling `waiting()` (the worker's heartbeat) meanwhile;
        False once `give_up()` says so."""
        while not give_up():
            view = self.state.current()
            if view.state == UP:
                self.held = False
                return True
            if not self.held:
                self.held = True
                log.info("deliveries held", destination=view.destination, state=view.state)
            waiting()
            self.stopping.wait(POLL_SECONDS)
        return False

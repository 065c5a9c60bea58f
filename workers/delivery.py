"""One delivery attempt of an order-status update, and what its outcome means.

One worker process delivers to one destination (receiver/destinations.py; `merchant` is the MERCHANT_*
settings). Its targets: a Standard Webhooks-signed POST to its URL and/or its handler, a Python
function. 2xx (or a handler that returns) is done; a network error, a timeout, 408, 429 and 5xx (or a
handler's exception) are retried on the destination's retry schedule (receiver/retries.py: about a day
by default), honouring Retry-After; any other answer (or PermanentDeliveryError from a handler)
dead-letters the update at once, as does the last of its attempts.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis
from rq.job import Retry, get_current_job
from standardwebhooks.webhooks import Webhook

from receiver import tracing
from receiver.chains import OrderChains, read_head
from receiver.clock import utc_now
from receiver.connections import sync_redis
from receiver.deadletters import entry as dead_letter_entry
from receiver.deadletters import read_dead_lettered
from receiver.deliveries import DeliveryRecord, count_attempt, done_field
from receiver.destination_state import DestinationState
from receiver.destinations import MERCHANT, Destination, queue_name
from receiver.errors import IntergiroReceiverError
from receiver.handler_errors import DeliveryError, MerchantAnswer, PermanentDeliveryError
from receiver.history import DEAD_LETTERED, DELIVERED, RETRY, attempt_entry
from receiver.logs import LoggedOutcome, log
from receiver.metrics.shared import count, counter_increment, observation_increments
from receiver.rediskeys import RedisKeys
from receiver.retries import RetrySchedule, retry_wait
from receiver.retry_after import parse_retry_after
from receiver.rqstore import RETRY_BUDGET
from receiver.settings import Settings
from workers.merchant_http import Answer, ConnectionOptions, MerchantConnection
from workers.streams import StreamTarget

# PermanentDeliveryError (imported above) stays importable from here for the handlers written before
# receiver.handler_errors was their module (tests/test_errors.py).

USER_AGENT = "intergiro-receiver"


class DeadLettered(LoggedOutcome):
    """Raised by the job once its update is in the dead-letter queue, so that RQ records the job as
    failed (RQ's FailedJobRegistry, where `rq info` and rq-dashboard count it). `intergiro-receiver dlq
    requeue` is the way back: it puts the update into its order's chain again, in order. Logged once,
    by `dead_letter`: RQ's own line with its traceback is left out (receiver.logs)."""


class TargetNotConfigured(IntergiroReceiverError):
    """Neither MERCHANT_WEBHOOK_URL nor MERCHANT_HANDLER is set (nor a destination's URL or handler),
    or the handler cannot be imported."""


def variable(destination: str, name: str) -> str:
    """The setting a destination's target comes from: MERCHANT_WEBHOOK_URL, DESTINATION_ERP_URL, ..."""
    if destination == MERCHANT:
        return {"URL": "MERCHANT_WEBHOOK_URL", "HANDLER": "MERCHANT_HANDLER"}[name]
    return f"DESTINATION_{destination.upper().replace('-', '_')}_{name}"


# 4xx answers that mean "not now" rather than "never": timeout, conflict (a concurrent change on the
# merchant's side), too early, too many requests.
RETRYABLE_4XX = (408, 409, 425, 429)


# Answers that say the destination is down rather than failing this update: a gateway or load balancer
# in front of it answering for it.
UNREACHABLE_STATUSES = (502, 503, 504)


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_4XX or status >= 500


class WebhookTarget:
    """POSTs the update to the merchant, signed per Standard Webhooks, over one kept-alive connection."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        timeout_seconds: float,
        options: ConnectionOptions | None = None,
        setting: str = "MERCHANT_WEBHOOK_URL",
    ) -> None:
        self.signer = Webhook(secret)
        try:
            self.connection = MerchantConnection(url, timeout_seconds, options)
        except ValueError as exc:
            raise TargetNotConfigured(f"{setting}: {exc}") from None

    def __call__(self, update: dict[str, Any], replay: bool = False) -> Answer:
        """POST the update (`replay`: queued again by `replay`, said in a `webhook-replay: 1` header);
        returns the merchant's 2xx answer, raises DeliveryError otherwise."""
        body = orjson.dumps(update)
        sent_at = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": update["id"],
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self.signer.sign(update["id"], sent_at, body.decode()),
            "Idempotency-Key": update["id"],
        }
        if replay:
            headers["webhook-replay"] = "1"
        with tracing.current().http_post(headers, self.connection.host, self.connection.port) as span:
            answer = self.connection.post(body, headers)  # raises PostFailed: no answer it could read
            span.set_attribute(tracing.HTTP_STATUS, answer.status)
        status = answer.status
        if 200 <= status < 300:
            return answer
        message = f"merchant answered HTTP {status}"
        if is_retryable_status(status):
            raise DeliveryError(
                message, parse_retry_after(answer.retry_after), status, answer,
                unreachable=status in UNREACHABLE_STATUSES,
            )  # fmt: skip
        raise PermanentDeliveryError(message, http_status=status, answer=answer)


class HandlerTarget:
    """Calls MERCHANT_HANDLER (`module:function`) with the update dict."""

    name = "handler"

    def __init__(self, path: str, setting: str = "MERCHANT_HANDLER") -> None:
        module_name, _, function_name = path.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            raise TargetNotConfigured(f"{setting}: cannot import {path}: {exc}") from None
        if not callable(function):
            raise TargetNotConfigured(f"{setting}: {path} is not callable")
        self.function: Callable[[dict[str, Any]], Any] = function

    def __call__(self, update: dict[str, Any], replay: bool = False) -> None:
        try:
            self.function(update)
        except DeliveryError:
            raise
        except Exception as exc:  # any exception of the merchant's code is a retryable failure
            raise DeliveryError(f"handler raised {type(exc).__name__}: {exc}") from None


Target = WebhookTarget | HandlerTarget | StreamTarget


def build_targets(config: Settings | Destination) -> list[Target]:
    """A destination's targets (`merchant`'s for Settings), webhook first, or its stream; raises
    TargetNotConfigured when there is none."""
    d = config.merchant if isinstance(config, Settings) else config
    if d.stream:
        return [StreamTarget(d.stream, d.stream_maxlen)]
    targets: list[Target] = []
    if d.url:
        options = ConnectionOptions.of(d)
        targets.append(WebhookTarget(d.url, d.secret, d.timeout_seconds, options, variable(d.name, "URL")))
    if d.handler:
        targets.append(HandlerTarget(d.handler, variable(d.name, "HANDLER")))
    if not targets:
        raise TargetNotConfigured(
            "set MERCHANT_WEBHOOK_URL (with MERCHANT_WEBHOOK_SECRET) or MERCHANT_HANDLER"
            + ("" if d.name == MERCHANT else " (or deliver only to DESTINATIONS with --destination)")
        )
    return targets


@dataclass(frozen=True)
class AttemptStart:
    """Where an attempt starts: whether the update is still its order's head, the attempt's number
    (counted before the POST, so an attempt whose worker dies still counts) and its delivery record."""

    update_id: str
    is_head: bool
    attempt: int
    record: DeliveryRecord
    dead_lettered: bool = False


def count_attempt_commands(pipe: Any, keys: RedisKeys, job: str) -> None:
    """Queue the commands that count an attempt of delivery `job` on a transaction: its number goes up
    by one, and it leaves the retry schedule (RQ's own scheduler may have queued it)."""
    count_attempt(pipe, keys.delivery(job))
    pipe.zrem(keys.retry_schedule, job)


def start_attempt_commands(pipe: Any, keys: RedisKeys, update: dict[str, Any], counted: bool = False) -> None:
    """Queue the commands that start an attempt on a transaction (counting it unless `counted`: RQ's
    preparation of the job counted it already, see workers.worker.DeliveryJob); `attempt_start` reads
    their answers."""
    job = keys.job_id(update["id"])
    if not counted:
        count_attempt_commands(pipe, keys, job)
    read_head(pipe, keys, update["order_id"])
    pipe.hgetall(keys.delivery(job))
    read_dead_lettered(pipe, keys, job)


def attempt_start(update: dict[str, Any], answers: list[Any], job: str | None = None) -> AttemptStart:
    """`job`: the delivery's job id (the update id, `merchant`'s)."""
    head, fields, dead_lettered = answers[-3:]
    job = job or update["id"]
    record = DeliveryRecord.parse(fields)
    return AttemptStart(job, head == job.encode(), record.attempts, record, bool(dead_lettered))


@dataclass(frozen=True)
class Outcomes:
    """The metrics fields of one destination's deliveries (labelled with it, except `merchant`'s)."""

    delivered: tuple[str, float]
    dead_lettered: tuple[str, float]
    retry_scheduled: tuple[str, float]
    attempts: dict[str, tuple[str, float]]
    labels: dict[str, str]

    @classmethod
    def of(cls, destination: Destination) -> Outcomes:
        labels = destination.label

        def outcome(name: str) -> tuple[str, float]:
            return counter_increment("intergiro_deliveries_total", 1, outcome=name, **labels)

        attempts = {
            result: counter_increment("intergiro_delivery_attempts_total", 1, result=result, **labels)
            for result in ("success", "retryable", "permanent")
        }
        return cls(
            outcome("delivered"), outcome("dead_lettered"), outcome("retry_scheduled"), attempts, labels
        )


@dataclass
class DeliveryContext:
    """What a worker process needs to deliver: built once per process and reused by every job."""

    settings: Settings
    redis: Redis
    keys: RedisKeys  # the destination's
    chains: OrderChains
    retries: RetrySchedule
    targets: list[Target]
    logger: Any  # bound once: structlog's module-level proxy binds anew on every call
    destination: Destination
    outcomes: Outcomes
    state: DestinationState  # its pause and breaker, shared with the worker's gate

    def start_attempt(self, update: dict[str, Any], counted: bool = False) -> AttemptStart:
        """Count the attempt (before the POST, so an attempt whose worker dies still counts; unless
        `counted`: RQ's preparation of the job counted it) and read where it starts. Without a count
        the transaction only reads, which costs Redis no disk flush."""
        with self.redis.pipeline(transaction=True) as pipe:
            start_attempt_commands(pipe, self.keys, update, counted)
            return attempt_start(update, pipe.execute(), self.keys.job_id(update["id"]))

    @classmethod
    def create(cls, settings: Settings, destination: Destination | None = None) -> DeliveryContext:
        """The context of one destination's worker (`merchant`'s when not given)."""
        destination = destination or settings.merchant
        redis = sync_redis(settings, timeout=10)
        keys = RedisKeys.of(settings).for_destination(destination.name)
        chains = OrderChains(redis, keys, settings.history_retention_seconds)
        retries = RetrySchedule(redis, keys, settings.history_retention_seconds)
        logger = log.bind() if destination.name == MERCHANT else log.bind(destination=destination.name)
        return cls(
            settings,
            redis,
            keys,
            chains,
            retries,
            build_targets(destination),
            logger,
            destination,
            Outcomes.of(destination),
            DestinationState(redis, keys, settings.breaker),
        )


_context: DeliveryContext | None = None


def use_context(context: DeliveryContext) -> None:
    """Set this process's delivery context (the worker runner does it before working)."""
    global _context
    _context = context


def current_context() -> DeliveryContext:
    if _context is None:  # a plain `rq worker` imported us: build from the environment, for the job's queue
        settings = Settings.from_env()
        job = get_current_job()
        destination = next(
            (
                d
                for d in settings.destinations
                if job and job.origin == queue_name(settings.queue_name, d.name)
            ),
            None,
        )
        use_context(DeliveryContext.create(settings, destination))
    assert _context is not None
    return _context


def deliver_from_job(update: dict[str, Any]) -> Retry | None:
    """One attempt at delivering `update` (see `deliver`); counted already when the running job is a
    workers.worker.DeliveryJob (`worker` runs them; a plain `rq worker` runs RQ's Job), which also says
    whether it is its down destination's probe."""
    job = get_current_job()
    counted = getattr(job, "attempt_counted", False) is True
    start = getattr(job, "attempt", None)  # read as the worker started the job (DeliveryWorker.start_jobs)
    ctx = current_context()
    with tracing.current().attempt(getattr(job, "meta", None), ctx.destination.name, update):
        return deliver(ctx, update, counted, getattr(job, "probe", False) is True, start)


def note_breaker(ctx: DeliveryContext, failure: DeliveryError | None, probe: bool) -> None:
    """Tell the destination's breaker what the attempt found; a destination back up gets every retrying
    update of its outage made due at once (each order still in sequence)."""
    if failure is not None and failure.unreachable:
        ctx.state.unreachable(str(failure), probe)
    elif ctx.state.reachable(probe):
        made = ctx.retries.retry_all_now()
        ctx.logger.info("retrying updates made due now: the destination is back", updates=made)


def deliver(
    ctx: DeliveryContext,
    update: dict[str, Any],
    counted: bool = False,
    probe: bool = False,
    start: AttemptStart | None = None,
) -> Retry | None:
    """One attempt; records its outcome in Redis. Returns None when the update is done (delivered, or
    finished before), a `Retry` for RQ to hold the job in its ScheduledJobRegistry until the next
    attempt, and raises DeadLettered when the update went to the dead-letter queue. `counted`: the
    attempt was counted in RQ's preparation of the job; `start`: where it starts, read then."""
    start = start if start is not None else ctx.start_attempt(update, counted)
    if not start.is_head:
        finished_before(ctx, start)
        return None
    record = start.record
    earlier = record.earlier_attempts  # before it was requeued: its entry counts them
    if start.attempt > ctx.destination.max_attempts:
        # Only after attempts that never reported back (their worker died): give up like any last attempt.
        last_error = record.last_error or "worker stopped during the attempt"
        error_at = record.last_error_at or utc_now()
        dead_letter(ctx, update, earlier + start.attempt - 1, last_error, error_at)
        raise DeadLettered(last_error)
    tried = try_targets(ctx, update, start)
    note_breaker(ctx, tried.failure, probe)
    counters = [
        ctx.outcomes.attempts[tried.result],
        *observation_increments("intergiro_delivery_seconds", tried.elapsed, **ctx.outcomes.labels),
    ]
    if tried.failure is None:
        # Delivered: the chain's next step and the attempt's metrics in one script run, before RQ records
        # the job's end: a job RQ runs again after that (its record failed, its worker died) finds the
        # update no longer its order's head and does not POST it again.
        stream = next((t.finish_args for t in ctx.targets if isinstance(t, StreamTarget)), None)
        ctx.chains.finish(
            update,
            counters=[*counters, ctx.outcomes.delivered],
            history=tried.history(DELIVERED),
            stream=stream,
        )
        ctx.logger.info("update delivered", **tried.logged)
        tracing.current().note_attempt("delivered", tried.logged)
        return None
    error, error_at = str(tried.failure), utc_now()
    if not tried.failure.retryable or start.attempt >= ctx.destination.max_attempts:
        attempts = earlier + start.attempt
        dead_letter(
            ctx, update, attempts, error, error_at, counters, tried.history(DEAD_LETTERED), tried.logged
        )
        tracing.current().note_attempt("dead_lettered", tried.logged)
        raise DeadLettered(error)
    return schedule_retry(ctx, update, tried, error_at, counters)


def finished_before(ctx: DeliveryContext, start: AttemptStart) -> None:
    """An update that is not its order's head: every update a worker runs is (see receiver.chains), so
    this one was finished already and runs again (its worker died before RQ recorded the end, or someone
    queued its job by hand). Raises DeadLettered when it is in the dead-letter queue."""
    job = start.update_id
    ctx.redis.delete(ctx.keys.delivery(job))
    if start.dead_lettered:  # its job requeued from outside (rq-dashboard's Requeue): failed it stays
        ctx.logger.info("update is dead-lettered, not delivered", update=job)
        raise DeadLettered("still in the dead-letter queue: requeue it with `intergiro-receiver dlq requeue`")
    labels = ctx.outcomes.labels
    count(ctx.redis, ctx.keys, "intergiro_deliveries_total", 1, outcome="duplicate_skipped", **labels)
    ctx.logger.info("update already finished, not delivered again", update=job)


@dataclass
class Tried:
    """What one attempt's targets did: the failure that stopped it (None: every target took the
    update), the last answer a webhook got, the targets tried, when it started and how long it took."""

    update: dict[str, Any]
    attempt: int
    replay: bool
    at: str
    elapsed: float
    failure: DeliveryError | None
    answer: MerchantAnswer | None
    targets: str  # as the history and the log name them: `webhook+handler`, `erp:webhook`

    @property
    def result(self) -> str:
        """The attempt's metrics label."""
        if self.failure is None:
            return "success"
        return "retryable" if self.failure.retryable else "permanent"

    @property
    def http_status(self) -> int | None:
        return None if self.answer is None else self.answer.status

    def history(self, outcome: str) -> bytes:
        """The attempt's history entry, with its `outcome`."""
        error = None if self.failure is None else str(self.failure)
        said = self.answer or Answer(0)  # what the merchant said: its body kept only when it refused
        update = self.update
        return attempt_entry(
            update["id"], update["order_id"], self.at, self.targets, outcome, self.http_status, error,
            self.elapsed * 1000, said.retry_after, said.content_type,
            said.body_start if self.failure is not None else b"", self.replay,
        )  # fmt: skip

    @property
    def logged(self) -> dict[str, Any]:
        """The attempt, as its log line says it."""
        return {
            "update": self.update["id"], "order": self.update["order_id"], "attempt": self.attempt,
            "target": self.targets, "http_status": self.http_status, "duration_ms": round(self.elapsed * 1000, 1),
            **({"replay": True} if self.replay else {}),
        }  # fmt: skip


def try_targets(ctx: DeliveryContext, update: dict[str, Any], start: AttemptStart) -> Tried:
    """POST (or hand) the update to each of the destination's targets that has not taken it in an
    earlier attempt, in order, until one fails; a target that took it is marked done on the delivery
    record, so that a retry does not repeat it."""
    done = start.record.done
    replay = start.record.replay  # queued again by `intergiro-receiver replay`
    pending = [t for t in ctx.targets if t.name not in done]  # others took it in an earlier attempt
    at, started = utc_now(), time.perf_counter()
    failure: DeliveryError | None = None
    answer: MerchantAnswer | None = None  # the last one a webhook target got
    tried: list[str] = []
    for n, target in enumerate(pending):
        tried.append(target.name)
        try:
            answer = target(update, replay=replay) or answer
        except DeliveryError as exc:
            failure = exc
            answer = exc.answer
            break
        except Exception as exc:  # e.g. RQ's job timeout firing mid-POST: retry like a network error
            failure = DeliveryError(f"{target.name}: {type(exc).__name__}: {exc}", unreachable=True)
            break
        if n < len(pending) - 1:  # a later target may fail: its retry must not repeat this one
            ctx.redis.hset(ctx.keys.delivery(start.update_id), done_field(target.name), 1)
    elapsed = time.perf_counter() - started
    names = "+".join(tried)
    if ctx.destination.name != MERCHANT:  # the history and the log tell the destinations' attempts apart
        names = f"{ctx.destination.name}:{names}"
    return Tried(update, start.attempt, replay, at, elapsed, failure, answer, names)


def schedule_retry(
    ctx: DeliveryContext,
    update: dict[str, Any],
    tried: Tried,
    error_at: str,
    counters: list[tuple[str, float]],
) -> Retry:
    """Schedule the update's next attempt after the failed one `tried`, on the destination's schedule."""
    failure = tried.failure
    assert failure is not None
    destination, error = ctx.destination, str(failure)
    delay = retry_wait(
        destination.retry_schedule, destination.backoff_seconds, tried.attempt, failure.retry_after
    )
    due = time.time() + delay
    ctx.retries.schedule_retry(
        update, due, error, error_at, [*counters, ctx.outcomes.retry_scheduled], history=tried.history(RETRY)
    )
    ctx.logger.info(
        "delivery retry scheduled",
        **tried.logged,
        error=error,
        retry_in=round(delay, 4),
        retry_after=failure.retry_after,
    )
    tracing.current().note_attempt("retry_scheduled", tried.logged)
    # RQ keeps the job, as scheduled, in its ScheduledJobRegistry (in whole seconds: never sooner than
    # `due`); the workers' maintenance queues it at `due` to the microsecond (receiver.retries.MOVE_DUE).
    return Retry(max=RETRY_BUDGET, interval=max(1, math.ceil(delay)))


def dead_letter(
    ctx: DeliveryContext,
    update: dict[str, Any],
    attempts: int,
    error: str,
    error_at: str,
    counters: list[tuple[str, float]] | None = None,
    history: bytes | None = None,
    logged: dict[str, Any] | None = None,
) -> None:
    """Move the update to the dead-letter queue and release its order (atomically, see receiver.chains),
    adding `counters` (the last attempt's metrics) and its `history` entry in the same step. `logged`:
    the last attempt, as its log line says it."""
    name = ctx.destination.name
    if history is None:  # no attempt of its own (its earlier ones never reported back)
        history = attempt_entry(
            update["id"], update["order_id"], error_at, "" if name == MERCHANT else f"{name}:", DEAD_LETTERED,
            None, error, 0,
        )  # fmt: skip
    status = logged.get("http_status") if logged else None
    entry = dead_letter_entry(ctx.keys.job_id(update["id"]), update, name, attempts, error, error_at, status)
    next_head = ctx.chains.finish(
        update, entry, counters=[*(counters or ()), ctx.outcomes.dead_lettered], history=history
    )
    attempt = logged or {"update": update["id"], "order": update["order_id"], "attempt": attempts}
    ctx.logger.warning(
        "update dead-lettered",
        **attempt,
        destination=name,
        error=error,
        next_update_of_order=next_head,
    )

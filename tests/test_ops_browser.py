"""The ops console in a real browser: headless Chromium (Debian's, through chromedriver and Selenium)
against `intergiro-receiver ops` as its own process, a real receiver, a real worker process and a real
sink. Each page is photographed: into docs/images/ for the README when SAVE_SCREENSHOTS=1 is set
(`SAVE_SCREENSHOTS=1 bin/test tests/test_ops_browser.py`), else into the test's own folder, so a test
run leaves the tree as it found it."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from receiver.app import KEYS, METRICS, REDIS
from receiver.rediskeys import RedisKeys
from receiver.settings import Settings
from tests.deadletter_seed import seed_dead_letters
from tests.processes import ROOT, free_port, start_server, stop
from tests.sink import Sink, wait_for
from tests.test_workers import post_order, webhook_settings

TOKEN = "browser-test-token-0123456789abcdefghijkl"
IMAGES = (
    ROOT / "docs" / "images"
    if os.environ.get("SAVE_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="ops-shots-"))
)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
T = TypeVar("T")


@pytest.fixture
def console(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """`intergiro-receiver ops` as its own process; its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "HTTP", "NO_PROXY"))}
    env.update(REDIS_URL=redis_url, OPS_TOKEN=TOKEN, OPS_PORT=str(port), LOG_FORMAT="json")
    log = tmp_path / "ops.log"
    process = start_server("ops", port=port, env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    yield url
    stop(process)
    assert re.search("ops: dead letters? (requeued|purged)", log.read_text())  # every action leaves a line


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    # bin/test installs them (bin/_browser); a missing browser fails here, never skips.
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "run: apt-get install chromium chromium-driver"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


async def step(work: Callable[[], T]) -> T:
    """A browser step, off the event loop (the receiver and the sink run on it)."""
    return await asyncio.to_thread(work)


def left(page: Any) -> bool:
    """Whether the browser left the document `page` is the root of. Selenium's `staleness_of` knows only
    the "stale element" answer; Chromium sometimes answers a node of a document being replaced with
    "Node with given id does not belong to the document" instead, which says the same."""
    try:
        page.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def follow(driver: WebDriver, element: Any) -> None:
    """Click (or press Enter in) `element` and wait until the page it leads to has loaded."""
    page = driver.find_element(By.TAG_NAME, "html")
    if element.tag_name == "input" and element.get_attribute("type") in ("search", "password", "text"):
        element.send_keys(Keys.ENTER)
    else:
        element.click()
    WebDriverWait(driver, 30).until(lambda _: left(page))
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def shot(driver: WebDriver, name: str) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(IMAGES / f"ops-{name}.png"))


def texts(driver: WebDriver, selector: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def until(
    driver: WebDriver, condition: Callable[[], bool], seconds: float = 30, reload: bool = False
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out on {driver.current_url}"
        time.sleep(0.3)
        if reload:
            driver.refresh()


async def test_an_operator_signs_in_requeues_a_dead_letter_and_watches_it_delivered_in_its_story(
    console: str, browser: WebDriver, receiver: Any, rsa_key: Any, sink: Sink, workers: Any, sync_redis: Any
) -> None:
    refused = {"yes"}
    sink.answer = lambda update_id, n: (
        (503, {"Retry-After": "3600"}, 0.0) if update_id.startswith("SlowShop") and n == 1
        else (400, {}, 0.0) if refused and update_id.startswith("BrowserOrder")
        else (200, {}, 0.0)
    )  # fmt: skip
    workers(**webhook_settings(sink))
    await post_order(receiver, rsa_key, "DeliveredOrder01", ("order", "charge"))
    [update_id] = await post_order(receiver, rsa_key, "BrowserOrder0001")
    [retrying] = await post_order(receiver, rsa_key, "SlowShopOrder001")
    await wait_for(lambda: sync_redis.hexists(RedisKeys().dead_letters, update_id), what="the dead letter")
    await wait_for(
        lambda: sync_redis.zscore(RedisKeys().retry_schedule, retrying) is not None, what="a retry"
    )
    app = receiver.server.app
    await app[METRICS].minutes.flush(app[REDIS], app[KEYS])

    def sign_in_wrong_then_right() -> None:
        browser.get(f"{console}/dlq")
        assert browser.current_url.startswith(f"{console}/login")
        browser.find_element(By.ID, "token").send_keys("not-the-token-but-long-enough-to-try-it")
        follow(browser, browser.find_element(By.ID, "sign-in"))
        assert "not the console's token" in browser.page_source
        shot(browser, "login")
        time.sleep(1.1)  # after a wrong token, no token is checked for a second (429 meanwhile)
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        follow(browser, browser.find_element(By.ID, "sign-in"))
        assert browser.current_url == f"{console}/dlq"
        assert texts(browser, "tr.entry td:nth-child(2)") == [update_id]
        assert "merchant answered HTTP 400" in browser.find_element(By.CSS_SELECTOR, "tr.entry").text
        shot(browser, "dlq")

    await step(sign_in_wrong_then_right)

    def a_post_without_csrf_is_refused() -> None:
        status = browser.execute_async_script(
            """const done = arguments[arguments.length - 1];
            const body = new URLSearchParams({action: "purge", confirm: "yes", id: arguments[0]});
            fetch("/dlq/act", {method: "POST", body, redirect: "manual"}).then(r => done(r.status));""",
            update_id,
        )
        assert status == 403

    await step(a_post_without_csrf_is_refused)
    assert sync_redis.hexists(RedisKeys().dead_letters, update_id)  # nothing changed

    def open_the_entry_and_ask_to_requeue() -> None:
        follow(browser, browser.find_element(By.LINK_TEXT, update_id))
        assert "merchant answered HTTP 400" in browser.page_source
        [attempt] = texts(browser, "#attempts tr.attempt")  # and what the merchant said
        assert "dead_lettered" in attempt and "HTTP 400" in attempt and "text/plain" in attempt
        assert browser.find_element(By.CSS_SELECTOR, "#attempts pre.answer").text == "no"
        shot(browser, "dlq-entry")
        follow(browser, browser.find_element(By.ID, "requeue-one"))
        assert texts(browser, "ul.ids li") == [update_id]
        shot(browser, "confirm")

    await step(open_the_entry_and_ask_to_requeue)
    refused.clear()

    def confirm_and_find_the_story() -> None:
        follow(browser, browser.find_element(By.ID, "confirm"))
        assert "requeued 1 of 1" in browser.find_element(By.CSS_SELECTOR, ".notice").text
        assert texts(browser, "tr.entry") == []
        search = browser.find_element(By.NAME, "key")
        search.send_keys("n-BrowserOrder0001")  # the merchant order number
        follow(browser, search)
        row = f'tr.update[data-id="{update_id}"] .state'
        until(browser, lambda: texts(browser, row) == ["delivered"], reload=True)
        story = browser.find_element(By.CSS_SELECTOR, "pre.timeline").text
        assert "queued by requeue" in story and "dead_lettered (HTTP 400)" in story
        assert "delivered (HTTP 200)" in story
        shot(browser, "order")

    await step(confirm_and_find_the_story)
    assert len(sink.attempts(update_id)) == 2

    def overview_and_retrying() -> None:
        follow(browser, browser.find_element(By.LINK_TEXT, "Overview"))
        assert browser.find_element(By.ID, "dlq-depth").text == "0"
        assert "accepted 3" in browser.find_element(By.CSS_SELECTOR, ".legend").text
        assert len(texts(browser, "table tbody tr")) >= 1  # the worker
        shot(browser, "overview")
        follow(browser, browser.find_element(By.LINK_TEXT, "Retrying"))
        assert browser.find_element(By.ID, "retrying-count").text.startswith("1-1 of 1 waiting")
        follow(browser, browser.find_element(By.ID, "sort-attempts"))  # most attempts first
        assert browser.find_element(By.ID, "sort-attempts").text == "attempts ▼"
        assert "sort=attempts" in browser.current_url and "dir=desc" in browser.current_url
        row = browser.find_element(By.CSS_SELECTOR, f'tr.retrying[data-id="{retrying}"]')
        assert "HTTP 503" in row.text
        shot(browser, "retrying")
        until(browser, lambda: sync_redis.hget(f"rq:job:{retrying}", "status") == b"scheduled")
        follow(browser, row.find_element(By.TAG_NAME, "button"))
        assert "retrying now" in browser.find_element(By.CSS_SELECTOR, ".notice").text
        assert "sort=attempts" in browser.current_url  # back on the page as it was sorted

    await step(overview_and_retrying)
    await wait_for(lambda: len(sink.attempts(retrying)) == 2, what="the retry made now")


async def test_an_operator_pages_through_ten_thousand_dead_letters_and_requeues_and_purges_all_matching(
    console: str, browser: WebDriver, sync_redis: Any, settings: Settings
) -> None:
    seed_dead_letters(sync_redis, settings, 10_000, "Refused")
    gone = seed_dead_letters(
        sync_redis, settings, 500, "Gone", error="merchant answered HTTP 410", http_status=410
    )
    dead_letters = RedisKeys().dead_letters

    def sign_in_and_page() -> None:
        browser.get(f"{console}/dlq")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        follow(browser, browser.find_element(By.ID, "sign-in"))
        assert browser.find_element(By.ID, "dlq-count").text == "1-50 of 10500"
        assert texts(browser, "tr.entry td:nth-child(2)")[0] == "Gone0000499-0-order"  # newest first
        follow(browser, browser.find_element(By.ID, "next-page"))
        assert browser.find_element(By.ID, "dlq-count").text == "51-100 of 10500"
        assert browser.find_element(By.ID, "page-of").text == "page 2 of 210"
        follow(browser, browser.find_element(By.ID, "sort-order"))
        assert texts(browser, "tr.entry td:nth-child(2)")[:2] == [
            "Gone0000000-0-order",
            "Gone0000001-0-order",
        ]
        shot(browser, "dlq-paged")

    await step(sign_in_and_page)

    def purge_one_page_selected() -> None:
        browser.find_element(By.ID, "select-all").click()
        follow(browser, browser.find_element(By.ID, "purge-selected"))
        assert len(texts(browser, "ul.ids li")) == 50
        follow(browser, browser.find_element(By.ID, "confirm"))
        assert "purged 50 of 50" in browser.find_element(By.CSS_SELECTOR, ".notice").text
        assert "sort=order" in browser.current_url  # the list as it was
        assert browser.find_element(By.ID, "dlq-count").text == "1-50 of 10450"

    await step(purge_one_page_selected)
    assert not any(sync_redis.hexists(dead_letters, i) for i in gone[:50])

    def requeue_all_matching_a_status() -> None:
        status = browser.find_element(By.NAME, "status")
        status.send_keys("410")
        follow(browser, status)
        assert browser.find_element(By.ID, "dlq-count").text == "1-50 of 450 matching (10450 in all)"
        follow(browser, browser.find_element(By.ID, "requeue-matching"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Requeue 450 update(s)?"
        assert "status 410" in browser.find_element(By.ID, "scope").text
        assert browser.find_element(By.ID, "more").text == "… and 430 more."
        follow(browser, browser.find_element(By.ID, "confirm"))
        assert (
            "requeued 450 dead letter(s) matching the filter"
            in browser.find_element(By.CSS_SELECTOR, ".notice").text
        )
        assert "status=410" in browser.current_url  # the filter survives the action
        assert browser.find_element(By.ID, "dlq-count").text == "0 matching (10000 in all)"

    await step(requeue_all_matching_a_status)
    assert sync_redis.hlen(dead_letters) == 10_000

    def purge_all() -> None:
        follow(browser, browser.find_element(By.LINK_TEXT, "clear"))
        follow(browser, browser.find_element(By.ID, "purge-matching"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Purge 10000 update(s)?"
        follow(browser, browser.find_element(By.ID, "confirm"))
        assert "purged 10000 dead letter(s)" in browser.find_element(By.CSS_SELECTOR, ".notice").text
        assert "Nothing is dead-lettered" in browser.page_source

    await step(purge_all)
    assert sync_redis.hlen(dead_letters) == 0

    def overview_refreshes_itself_once_asked() -> None:
        follow(browser, browser.find_element(By.LINK_TEXT, "Overview"))
        assert texts(browser, 'tr.destination[data-name="merchant"] td')[:4] == [
            "merchant",
            "450",
            "0",
            "0",
        ]  # requeued, no worker running
        at = browser.find_element(By.ID, "overview-at").text
        browser.find_element(By.ID, "auto-refresh").click()
        until(browser, lambda: browser.find_element(By.ID, "overview-at").text != at)
        assert browser.find_element(By.ID, "auto-refresh").is_selected()  # still on after the reload

    await step(overview_refreshes_itself_once_asked)

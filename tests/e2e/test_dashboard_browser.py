"""The dashboard in a real browser: headless Chromium (Debian's `chromium`)
driven by Playwright with the system browser (no `playwright install`).

Runs the newcomer's story: open the overview, drill into a queue's groups
and a group, watch it fill live (auto-refresh), archive a member through
the confirm dialog, then start a real pgq.Server and watch the group get
aggregated, and follow the lineage from a member to its aggregated task.
Screenshots go to test-artifacts/dashboard/.

CI needs: `apt-get install -y chromium` and `pip install playwright` (in the
`test` extra). Without either, these tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("PGQ_TEST_CHROMIUM", "/usr/bin/chromium")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(
        f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set PGQ_TEST_CHROMIUM)",
        allow_module_level=True,
    )
playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: pip install playwright"
)
uvicorn = pytest.importorskip("uvicorn", reason="the dashboard extra is not installed")

import pgq  # noqa: E402
from pgq.dashboard import Settings, create_app  # noqa: E402
from tests.fixtures.util import free_port  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000

expect = playwright_sync.expect


@pytest.fixture
def dashboard_url(dsn: str) -> Iterator[str]:
    """The dashboard served by uvicorn in a thread, refreshing every 0.5 s."""
    app = create_app(dsn, settings=Settings(refresh=0.5, group_grace_period=0.5))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling uvicorn's own flag, bounded by the deadline
    assert server.started, "the dashboard did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield pg
            assert errors == [], f"errors in the browser console: {errors}"
        finally:
            browser.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_overview_group_action_and_live_aggregation(dsn: str, dashboard_url: str, page: Any) -> None:
    queue, group = "tutorial", "user1:email"
    client = pgq.Client(dsn)
    try:
        first = [client.enqueue(pgq.Task("message", f"hi {i}"), queue=queue, group=group) for i in range(2)]
        client.enqueue(pgq.Task("email:send", {"to": "a@example.com"}), queue="mail")

        # Overview: both queues with counts per state.
        page.goto(dashboard_url + "/")
        row = page.locator('tr[data-queue="tutorial"]')
        expect(row).to_be_visible()
        expect(row.locator("td.state-aggregating")).to_have_text("2")
        expect(page.locator('tr[data-queue="mail"] td.state-pending')).to_have_text("1")
        expect(page.locator("svg").first).to_be_visible()
        shot(page, "01-overview")

        # Drill in: the queue's groups, then the group.
        row.locator("td.state-aggregating a").click()
        expect(page.locator("h1")).to_contain_text("tutorial")
        page.get_by_role("link", name=re.compile(r"groups \(1\)")).click()
        size = page.locator(f'tr[data-group="{group}"] td.size')
        expect(size).to_have_text("2")

        # Live: a new member shows up without a reload (auto-refresh).
        client.enqueue(pgq.Task("message", "hi 2"), queue=queue, group=group)
        expect(size).to_have_text("3", timeout=WAIT_MS)
        shot(page, "02-groups")

        page.locator(f'tr[data-group="{group}"] a.name').click()
        expect(page.locator("#group-facts .size")).to_have_text("3")
        expect(page.locator("#members tr[data-task]")).to_have_count(3)
        shot(page, "03-group")

        # An action: archive one member, through the confirm dialog (with
        # auto-refresh off, so that no refresh races the click).
        page.locator("#autorefresh").uncheck()
        dialogs: list[str] = []

        def accept(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        page.locator(f'#members tr[data-task="{first[0].id}"] button[data-action="task_archive"]').click()
        expect(page.locator(".flash.ok")).to_contain_text(f"task {first[0].id} archived")
        assert dialogs and f"Archive task {first[0].id}" in dialogs[0]
        expect(page.locator("#members tr[data-task]")).to_have_count(2)
        expect(page.locator("#group-facts .size")).to_have_text("2")
        shot(page, "04-after-archive")

        # A dismissed dialog does nothing.
        page.once("dialog", lambda d: d.dismiss())
        page.locator(f'#members tr[data-task="{first[1].id}"] button[data-action="task_delete"]').click()
        expect(page.locator("#members tr[data-task]")).to_have_count(2)
        page.locator("#autorefresh").check()

        # A server aggregates the group: the page shows it live.
        def aggregate(g: str, tasks: list[pgq.Task]) -> pgq.Task:
            return pgq.Task("digest", [t.payload for t in tasks], retention=300)

        handled = threading.Event()
        mux = pgq.ServeMux()
        mux.handle("digest", lambda task: handled.set())
        mux.handle("email:", lambda task: None)
        server = pgq.Server(
            dsn,
            queues={queue: 1, "mail": 1},
            concurrency=2,
            group_aggregator=aggregate,
            group_grace_period=0.3,
        )
        server.start(mux)
        try:
            expect(page.locator("#group-empty")).to_be_visible(timeout=WAIT_MS)
            assert handled.wait(WAIT_MS / 1000), "the aggregated task was not handled"
        finally:
            server.shutdown()
        shot(page, "05-group-aggregated")

        # Lineage: a member's page leads to its aggregated task, which lists its members.
        page.goto(f"{dashboard_url}/task?queue={queue}&id={first[1].id}")
        page.locator("#aggregate-link").click()
        expect(page.locator("#task-state")).to_have_text("completed")
        expect(page.locator("#lineage")).to_contain_text("aggregates 2 members")
        expect(page.locator("#payload")).to_contain_text("hi 1")
        shot(page, "06-aggregated-task")

        # The overview's throughput chart counts what the server processed.
        page.goto(dashboard_url + "/")
        expect(page.locator("figure.chart figcaption").first).to_contain_text(
            re.compile(r"[1-9]\d* in 14 days")
        )
        shot(page, "07-overview-after")
    except BaseException:
        shot(page, "failure")  # what the browser showed when the test failed
        raise
    finally:
        client.close()


def test_confirmation_page_without_javascript(dsn: str, dashboard_url: str) -> None:
    """With JavaScript off, an action asks on a page of its own."""
    with pgq.Client(dsn) as client:
        info = client.enqueue(pgq.Task("x", "<b>not bold</b>"), queue="nojs", process_in=3600)
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(java_script_enabled=False).new_page()
            page.goto(f"{dashboard_url}/task?queue=nojs&id={info.id}")
            expect(page.locator("#payload")).to_have_text("<b>not bold</b>")
            page.locator('button[data-action="task_run"]').click()
            expect(page.locator("#confirm-text")).to_contain_text(f"Run task {info.id} of queue nojs now?")
            shot(page, "08-confirm-page")
            page.locator("#confirm-yes").click()
            expect(page.locator(".flash.ok")).to_contain_text("is now pending")
            expect(page.locator("#task-state")).to_have_text("pending")
        finally:
            browser.close()

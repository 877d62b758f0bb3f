"""The dashboard's ASGI application: server-rendered pages and POST actions.

Pages (GET; names travel in the query string, so any queue, group or task id
works, slashes included):

    /                         overview: queues, counts per state, daily charts
    /queue?queue=Q&state=S    tasks of a queue by state, paged; search by id
    /groups?queue=Q           groups waiting to be aggregated
    /group?queue=Q&group=G    one group's members, paged
    /task?queue=Q&id=I        one task: payload, errors, result, lineage
    /servers                  servers and their active workers
    /periodic, /periodic/entry?id=E   periodic entries and their ticks

Actions (POST /action, CSRF token, confirmation): run, archive, delete, cancel
one task; run/archive/delete all tasks of a state or a group; pause/unpause.
Without `confirmed=1` (which the page's script sets after window.confirm) the
action answers with a confirmation page instead of acting.

Every value is escaped by Jinja2's autoescape; payloads, results and errors are
shown as text in <pre>. Pages refresh themselves: app.js fetches the page again
and swaps its <main>.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
import psycopg
from psycopg.conninfo import conninfo_to_dict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgq import db
from pgq.config import DEFAULT_GRACE_PERIOD
from pgq.errors import PgqError, QueueNotFoundError, TaskNotFoundError
from pgq.inspector import ARCHIVABLE_STATES, DELETABLE_STATES, RUNNABLE_STATES, GroupInfo, Inspector
from pgq.scheduler import EntryNotFoundError
from pgq.task import STATES, TaskInfo

from .data import Data
from .security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    Auth,
    host_allowed,
    new_csrf_cookie,
    origin_ok,
    safe_back,
)

logger = logging.getLogger("pgq.dashboard")

FLASH_COOKIE = "pgq_flash"
PAGE_SIZE = 20
STATE_ORDER = ("active", "pending", "aggregating", "scheduled", "retry", "archived", "completed")
CHART_DAYS = (7, 14, 30, 90)


#: How a GroupInfo's next_due_at was worked out (GroupInfo.due_by), for people.
_DUE_BY = {
    "retry": "retry after a failed aggregation",
    "max_size": "full (max size)",
    "grace_period": "newest + grace period",
    "max_delay": "oldest + max delay",
}


@dataclass(frozen=True)
class Settings:
    """How the dashboard behaves (the CLI's options)."""

    refresh: float = 2.0  # seconds between auto-refreshes; 0: off
    read_only: bool = False
    page_size: int = PAGE_SIZE
    # for the next-due estimate when no running server publishes its policy
    group_grace_period: float = DEFAULT_GRACE_PERIOD
    group_max_delay: float | None = None
    group_max_size: int | None = None


@dataclass(frozen=True)
class Day:
    date: date
    processed: int
    failed: int


@dataclass(frozen=True)
class QueueRow:
    """A row of the view pgq.queue_stats, named as pgq.QueueInfo is."""

    queue: str
    paused: bool
    size: int
    pending: int
    active: int
    scheduled: int
    retry: int
    aggregating: int
    archived: int
    completed: int
    groups: int
    counts_exact: bool
    latency: timedelta
    processed: int
    failed: int

    @classmethod
    def from_view(cls, r: dict[str, Any]) -> QueueRow:
        counts = {k: int(r[k] or 0) for k in (*STATES, "size", "groups")}
        return cls(
            queue=r["queue"],
            paused=bool(r["paused"]),
            counts_exact=bool(r["counts_exact"]),
            latency=timedelta(seconds=float(r["latency_seconds"] or 0)),
            processed=int(r["processed_today"] or 0),
            failed=int(r["failed_today"] or 0),
            **counts,
        )


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- formatting ---------------------------------------------------------------------


def _fmt_ts(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _fmt_dur(value: timedelta | float | None) -> str:
    if value is None:
        return "—"
    s = value.total_seconds() if isinstance(value, timedelta) else float(value)
    sign = "-" if s < 0 else ""
    s = abs(s)
    if s < 10:
        return f"{sign}{s:.1f}s"
    if s < 120:
        return f"{sign}{s:.0f}s"
    if s < 7200:
        return f"{sign}{int(s // 60)}m {int(s % 60)}s"
    if s < 172800:
        return f"{sign}{int(s // 3600)}h {int(s % 3600 // 60)}m"
    return f"{sign}{int(s // 86400)}d {int(s % 86400 // 3600)}h"


def _rel(value: datetime | None, now: datetime) -> str:
    if value is None:
        return ""
    d = (value - now).total_seconds()
    if abs(d) < 0.05:
        return "now"
    return f"in {_fmt_dur(d)}" if d > 0 else f"{_fmt_dur(-d)} ago"


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _url(path: str, **params: Any) -> str:
    clean = {k: v for k, v in params.items() if v is not None and v != ""}
    return path + ("?" + urlencode(clean) if clean else "")


def _scrub(text: str, secrets_: list[str]) -> str:
    for s in secrets_:
        if s:
            text = text.replace(s, "***")
    return text


def _chart(days: list[Any], key: str, width: int = 560, height: int = 140) -> dict[str, Any]:
    """Bars of one series for an inline SVG (values are numbers; labels are dates)."""
    values = [int(getattr(d, key)) for d in days]
    top = max(values, default=0)
    scale_top = max(1, top)
    n = max(1, len(values))
    left, bottom, plot_h = 40, 20, height - 30
    slot = (width - left - 5) / n
    bars = []
    for i, (d, v) in enumerate(zip(days, values, strict=True)):
        h = 0.0 if v == 0 else max(1.0, plot_h * v / scale_top)
        bars.append(
            {
                "x": round(left + i * slot + slot * 0.1, 1),
                "y": round(height - bottom - h, 1),
                "w": round(max(1.0, slot * 0.8), 1),
                "h": round(h, 1),
                "value": v,
                "day": d.date.isoformat(),
            }
        )
    step = max(1, math.ceil(n / 7))
    labels = [
        {"x": round(b["x"] + b["w"] / 2, 1), "text": b["day"][5:]}
        for i, b in enumerate(bars)
        if i % step == 0
    ]
    return {
        "width": width,
        "height": height,
        "bars": bars,
        "labels": labels,
        "top": top,
        "total": sum(values),
        "base_y": height - bottom,
        "left": left,
    }


# -- actions ------------------------------------------------------------------------


ActionRun = Callable[[Inspector, dict[str, str]], str]


@dataclass(frozen=True)
class Action:
    fields: tuple[str, ...]
    title: str  # for the confirmation: formatted with the form's fields
    run: ActionRun  # returns the message shown afterwards
    danger: bool = False


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def _check_state(state: str, allowed: tuple[str, ...], verb: str) -> str:
    if state not in allowed:
        raise HTTPError(400, f"cannot {verb} {state} tasks; {verb} applies to: {', '.join(allowed)}")
    return state


def _on_task(op: Callable[[Inspector, str, str], object], done: str) -> ActionRun:
    """An action on one task (fields queue, id); `done` is formatted with the fields."""

    def run(i: Inspector, f: dict[str, str]) -> str:
        op(i, f["queue"], f["id"])
        return done.format(**f)

    return run


def _on_state(
    op: Callable[[Inspector, str, str], int], allowed: tuple[str, ...], verb: str, done: str
) -> ActionRun:
    """An action on every task of a state (fields queue, state); refused for a state not in `allowed`."""

    def run(i: Inspector, f: dict[str, str]) -> str:
        return _n(op(i, f["queue"], _check_state(f["state"], allowed, verb)), "task") + done

    return run


def _on_group(op: Callable[[Inspector, str, str], int], done: str) -> ActionRun:
    """An action on every member of an aggregation group (fields queue, group)."""

    def run(i: Inspector, f: dict[str, str]) -> str:
        return _n(op(i, f["queue"], f["group"]), "task") + done

    return run


def _queue_pause(i: Inspector, f: dict[str, str]) -> str:
    i.pause_queue(f["queue"])
    return f"queue {f['queue']} paused"


def _queue_unpause(i: Inspector, f: dict[str, str]) -> str:
    i.unpause_queue(f["queue"])
    return f"queue {f['queue']} resumed"


_UNDONE = " This cannot be undone."
ACTIONS: dict[str, Action] = {
    "task_run": Action(
        ("queue", "id"),
        "Run task {id} of queue {queue} now?",
        _on_task(Inspector.run_task, "task {id} is now pending"),
    ),
    "task_archive": Action(
        ("queue", "id"),
        "Archive task {id} of queue {queue}?",
        _on_task(Inspector.archive_task, "task {id} archived"),
    ),
    "task_delete": Action(
        ("queue", "id"),
        "Delete task {id} of queue {queue}?" + _UNDONE,
        _on_task(Inspector.delete_task, "task {id} deleted"),
        danger=True,
    ),
    "task_cancel": Action(
        ("queue", "id"),
        "Cancel active task {id} of queue {queue}? Its worker stops it and it is retried.",
        _on_task(Inspector.cancel_task, "cancellation of task {id} sent to its worker"),
        danger=True,
    ),
    "state_run_all": Action(
        ("queue", "state"),
        "Run every {state} task of queue {queue} now?",
        _on_state(Inspector.run_all_tasks, RUNNABLE_STATES, "run", " now pending"),
    ),
    "state_archive_all": Action(
        ("queue", "state"),
        "Archive every {state} task of queue {queue}?",
        _on_state(Inspector.archive_all_tasks, ARCHIVABLE_STATES, "archive", " archived"),
    ),
    "state_delete_all": Action(
        ("queue", "state"),
        "Delete every {state} task of queue {queue}?" + _UNDONE,
        _on_state(Inspector.delete_all_tasks, DELETABLE_STATES, "delete", " deleted"),
        danger=True,
    ),
    "group_run_all": Action(
        ("queue", "group"),
        "Run every member of group {group} (queue {queue}) now, each on its own, without aggregating?",
        _on_group(Inspector.run_all_aggregating_tasks, " now pending"),
    ),
    "group_archive_all": Action(
        ("queue", "group"),
        "Archive every member of group {group} (queue {queue})?",
        _on_group(Inspector.archive_all_aggregating_tasks, " archived"),
    ),
    "group_delete_all": Action(
        ("queue", "group"),
        "Delete every member of group {group} (queue {queue})?" + _UNDONE,
        _on_group(Inspector.delete_all_aggregating_tasks, " deleted"),
        danger=True,
    ),
    "queue_pause": Action(
        ("queue",),
        "Pause queue {queue}? Workers stop claiming its tasks (groups still aggregate).",
        _queue_pause,
    ),
    "queue_unpause": Action(("queue",), "Resume queue {queue}?", _queue_unpause),
}

# -- the guard (auth, host, headers) --------------------------------------------------


class Guard:
    """ASGI middleware: Host check, authentication, security headers."""

    OPEN_PATHS = ("/login", "/static/")

    def __init__(
        self, app: ASGIApp, auth: Auth, login_page: Callable[[Request], Awaitable[Response]]
    ) -> None:
        self.app = app
        self.auth = auth
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for k, v in SECURITY_HEADERS.items():
                    if k.encode() not in present:
                        headers.append((k.encode(), v.encode()))
                message["headers"] = headers
            await send(message)

        request = Request(scope)
        if not host_allowed(request.headers.get("host"), self.auth):
            resp: Response = Response("invalid Host header\n", status_code=400, media_type="text/plain")
            await resp(scope, receive, send_with_headers)
            return
        path: str = scope["path"]
        if not path.startswith(self.OPEN_PATHS) and not self.auth.allows(
            request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE)
        ):
            if self.auth.token is not None and request.method == "GET":
                resp = await self.login_page(request)
                resp.status_code = 401
            else:
                resp = Response("authentication required\n", status_code=401, media_type="text/plain")
            if self.auth.basic is not None:
                resp.headers["www-authenticate"] = 'Basic realm="pgq dashboard", charset="UTF-8"'
            await resp(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


# -- the application ------------------------------------------------------------------


class Dashboard:
    """Routes and rendering over one Data."""

    def __init__(self, data: Data, auth: Auth, settings: Settings) -> None:
        self.data = data
        self.auth = auth
        self.settings = settings
        self.dsn_label = db.redact(data.dsn)
        try:
            password = conninfo_to_dict(data.dsn).get("password")
        except psycopg.ProgrammingError:
            password = None
        self._secrets = [str(password)] if password else []
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("pgq.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(ts=_fmt_ts, dur=_fmt_dur, pretty=_pretty, short=_short)
        self.env.globals.update(url=_url, rel=_rel, STATES=STATE_ORDER, ACTIONS=ACTIONS)
        self.env.globals.update(
            RUNNABLE=RUNNABLE_STATES, ARCHIVABLE=ARCHIVABLE_STATES, DELETABLE=DELETABLE_STATES
        )

    # -- plumbing ---------------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    def render(self, request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        cookie = request.cookies.get(CSRF_COOKIE) or new_csrf_cookie()
        flash = None
        raw = request.cookies.get(FLASH_COOKIE)
        if raw and request.headers.get("x-pgq-refresh") is None:
            try:
                flash = json.loads(base64.urlsafe_b64decode(raw.encode()).decode())
            except (ValueError, UnicodeDecodeError):
                flash = None
        values: dict[str, Any] = {
            "now": None,
            "request_path": request.url.path,
            "back": request.url.path + ("?" + request.url.query if request.url.query else ""),
            "csrf": self.auth.csrf_token(cookie),
            "csrf_field": CSRF_FIELD,
            "flash": flash if isinstance(flash, dict) else None,
            "dsn": self.dsn_label,
            "refresh": self.settings.refresh,
            "read_only": self.settings.read_only,
            "auth_token": self.auth.token is not None,
        }
        values.update(ctx)
        html = self.env.get_template(template).render(values)
        resp = HTMLResponse(_scrub(html, self._secrets), status_code=status)
        if request.cookies.get(CSRF_COOKIE) != cookie:
            resp.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict", path="/")
        if raw and request.headers.get("x-pgq-refresh") is None:
            resp.delete_cookie(FLASH_COOKIE, path="/")
        return resp

    def error_page(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status=status, message=_scrub(message, self._secrets))

    def redirect(self, to: str, flash: tuple[str, str] | None = None) -> RedirectResponse:
        resp = RedirectResponse(to, status_code=303)
        if flash is not None:
            value = base64.urlsafe_b64encode(
                json.dumps({"kind": flash[0], "text": flash[1]}).encode()
            ).decode()
            resp.set_cookie(FLASH_COOKIE, value, httponly=True, samesite="strict", path="/", max_age=60)
        return resp

    def wrap(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPError as exc:
                return self.error_page(request, exc.status, exc.message)
            except (QueueNotFoundError, TaskNotFoundError, EntryNotFoundError) as exc:
                return self.error_page(request, 404, str(exc))
            except (PgqError, ValueError, TypeError) as exc:
                return self.error_page(request, 400, str(exc))
            except psycopg.Error as exc:
                logger.warning("dashboard: database error: %s", _scrub(str(exc), self._secrets))
                return self.error_page(request, 503, f"database error: {exc}")

        return endpoint

    @staticmethod
    def arg(request: Request, name: str, required: bool = True) -> str:
        value = request.query_params.get(name)
        if value is None or value == "":
            if required:
                raise HTTPError(400, f"missing query parameter {name!r}")
            return ""
        return value

    @staticmethod
    def int_arg(request: Request, name: str, default: int, lo: int = 1, hi: int = 1_000_000) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HTTPError(400, f"{name} must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise HTTPError(400, f"{name} must be between {lo} and {hi}, got {value}")
        return value

    # -- pages ------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        days = self.int_arg(request, "days", 14, 1, 366)

        def load() -> tuple[list[QueueRow], list[Day], datetime]:
            queues = [QueueRow.from_view(r) for r in self.data.queue_overview()]
            series = [
                Day(r["day"], int(r["processed"]), int(r["failed"])) for r in self.data.daily_totals(days)
            ]
            return queues, series, self.data.now()

        queues, series, now = await self.call(load)
        sums = {s: sum(getattr(q, s) for q in queues) for s in (*STATES, "groups", "size")}
        return self.render(
            request,
            "overview.html",
            queues=queues,
            sums=sums,
            exact=all(q.counts_exact for q in queues),
            days=days,
            chart_days=CHART_DAYS,
            throughput=_chart(series, "processed"),
            failures=_chart(series, "failed"),
            now=now,
        )

    async def queue(self, request: Request) -> Response:
        queue = self.arg(request, "queue")
        search = request.query_params.get("id", "").strip()
        if search:
            return RedirectResponse(_url("/task", queue=queue, id=search), status_code=303)
        state = request.query_params.get("state") or ""
        page = self.int_arg(request, "page", 1)
        insp = self.data.inspector

        def load() -> tuple[Any, str, list[TaskInfo], datetime]:
            info = insp.get_queue_info(queue)
            st = state or next((s for s in STATE_ORDER if getattr(info, s)), "pending")
            if st not in STATES:
                raise HTTPError(400, f"unknown task state {st!r}; states are: {', '.join(STATES)}")
            tasks = insp.list_tasks(queue, st, page=page, page_size=self.settings.page_size)
            return info, st, tasks, self.data.now()

        info, state, tasks, now = await self.call(load)
        count = getattr(info, state)
        pages = max(1, math.ceil(count / self.settings.page_size))
        return self.render(
            request,
            "queue.html",
            info=info,
            state=state,
            tasks=tasks,
            page=page,
            pages=pages,
            count=count,
            now=now,
        )

    def next_due(self, g: GroupInfo) -> tuple[datetime | None, str]:
        """When a group is expected to be aggregated, and how that was worked out: from
        the policy the running servers publish, else estimated from the dashboard's
        --group-* options (no server aggregating the queue is running)."""
        if g.next_due_at is not None:
            return g.next_due_at, _DUE_BY.get(g.due_by or "", g.due_by or "")
        s = self.settings
        if s.group_max_size and g.size >= s.group_max_size:
            return g.newest_at, "full (max size)"
        due = g.newest_at + timedelta(seconds=s.group_grace_period)
        how = f"newest + grace {_fmt_dur(s.group_grace_period)}"
        if s.group_max_delay:
            cap = g.oldest_at + timedelta(seconds=s.group_max_delay)
            if cap < due:
                due, how = cap, f"oldest + max delay {_fmt_dur(s.group_max_delay)}"
        return due, how + " (estimate)"

    async def groups(self, request: Request) -> Response:
        queue = self.arg(request, "queue")
        insp = self.data.inspector

        def load() -> tuple[Any, list[GroupInfo], datetime]:
            return insp.get_queue_info(queue), insp.groups(queue), self.data.now()

        info, groups, now = await self.call(load)
        rows = [(g, *self.next_due(g)) for g in groups]
        return self.render(request, "groups.html", info=info, rows=rows, now=now)

    async def group(self, request: Request) -> Response:
        queue = self.arg(request, "queue")
        group = self.arg(request, "group")
        page = self.int_arg(request, "page", 1)
        insp = self.data.inspector

        def load() -> tuple[Any, GroupInfo | None, list[TaskInfo], datetime]:
            info = insp.get_queue_info(queue)
            g = next((x for x in insp.groups(queue) if x.group == group), None)
            members = insp.list_aggregating_tasks(queue, group, page=page, page_size=self.settings.page_size)
            return info, g, members, self.data.now()

        info, g, members, now = await self.call(load)
        due = self.next_due(g) if g is not None else (None, "")
        pages = max(1, math.ceil((g.size if g else 0) / self.settings.page_size))
        return self.render(
            request,
            "group.html",
            info=info,
            group=group,
            g=g,
            due=due,
            members=members,
            page=page,
            pages=pages,
            now=now,
        )

    async def task(self, request: Request) -> Response:
        queue = self.arg(request, "queue")
        task_id = self.arg(request, "id")
        insp = self.data.inspector

        def load() -> tuple[TaskInfo | None, TaskInfo | None, datetime]:
            try:
                t = insp.get_task_info(queue, task_id)
            except TaskNotFoundError:
                return None, self.data.aggregate_of(queue, task_id), self.data.now()
            return t, None, self.data.now()

        task, aggregate, now = await self.call(load)
        if task is None:
            status = 200 if aggregate is not None else 404
            return self.render(
                request,
                "task_gone.html",
                status=status,
                queue=queue,
                task_id=task_id,
                aggregate=aggregate,
                now=now,
            )
        return self.render(request, "task.html", task=task, now=now)

    async def servers(self, request: Request) -> Response:
        def load() -> tuple[list[Any], datetime]:
            return self.data.inspector.servers(), self.data.now()

        servers, now = await self.call(load)
        return self.render(request, "servers.html", servers=servers, now=now)

    async def periodic(self, request: Request) -> Response:
        def load() -> tuple[list[Any], datetime]:
            return self.data.periodic_entries(), self.data.now()

        entries, now = await self.call(load)
        return self.render(request, "periodic.html", entries=entries, now=now)

    async def periodic_entry(self, request: Request) -> Response:
        entry_id = self.arg(request, "id")

        def load() -> tuple[Any, list[Any], datetime]:
            entry = next((e for e in self.data.periodic_entries() if e.id == entry_id), None)
            return entry, self.data.entry_history(entry_id), self.data.now()

        entry, ticks, now = await self.call(load)
        return self.render(
            request, "periodic_entry.html", entry=entry, entry_id=entry_id, ticks=ticks, now=now
        )

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        types = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
        if name not in types:
            return Response("not found\n", status_code=404, media_type="text/plain")
        body = (resources.files("pgq.dashboard") / "static" / name).read_bytes()
        resp = Response(body, media_type=types[name])
        resp.headers["cache-control"] = "no-cache"
        return resp

    # -- forms ------------------------------------------------------------------------

    async def form(self, request: Request) -> FormData:
        if not origin_ok(request.headers.get("origin"), request.headers.get("host")):
            raise HTTPError(403, "cross-site request refused (Origin does not match this host)")
        form = await request.form()
        token = form.get(CSRF_FIELD)
        if not self.auth.csrf_ok(request.cookies.get(CSRF_COOKIE), token if isinstance(token, str) else None):
            raise HTTPError(403, "missing or invalid CSRF token: reload the page and try again")
        return form

    async def action(self, request: Request) -> Response:
        if self.settings.read_only:
            raise HTTPError(403, "this dashboard is read-only (started with --read-only)")
        form = await self.form(request)
        name = form.get("action")
        act = ACTIONS.get(name) if isinstance(name, str) else None
        if act is None:
            raise HTTPError(400, f"unknown action {name!r}; actions are: {', '.join(ACTIONS)}")
        fields: dict[str, str] = {}
        for f in act.fields:
            v = form.get(f)
            if not isinstance(v, str) or not v:
                raise HTTPError(400, f"action {name} needs the form field {f!r}")
            fields[f] = v
        back_raw = form.get("back")
        back = safe_back(
            back_raw if isinstance(back_raw, str) else None, _url("/queue", queue=fields["queue"])
        )
        title = act.title.format(**fields)
        if form.get("confirmed") != "1":
            return self.render(
                request, "confirm.html", name=name, fields=fields, title=title, action=act, back=back
            )
        assert isinstance(name, str)
        try:
            message = await self.call(act.run, self.data.inspector, fields)
        except (HTTPError, PgqError, ValueError, TypeError) as exc:
            logger.info("dashboard: action %s %s failed: %s", name, fields, exc)
            return self.redirect(back, ("error", getattr(exc, "message", None) or str(exc)))
        logger.info("dashboard: action %s %s: %s", name, fields, message)
        if name == "task_delete" and back.startswith("/task?"):
            back = _url("/queue", queue=fields["queue"])
        return self.redirect(back, ("ok", message))

    async def login(self, request: Request) -> Response:
        if self.auth.token is None:
            return RedirectResponse("/", status_code=303)
        if request.method == "GET":
            return self.login_form(request)
        form = await self.form(request)
        given = form.get("token")
        if isinstance(given, str) and self.auth.token_matches(given):
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(
                SESSION_COOKIE, self.auth.session_value(), httponly=True, samesite="strict", path="/"
            )
            return resp
        logger.warning("dashboard: failed login from %s", request.client.host if request.client else "?")
        return self.login_form(request, status=401, error="wrong token")

    async def logout(self, request: Request) -> Response:
        await self.form(request)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    async def login_page(self, request: Request) -> Response:
        return self.login_form(request)

    def login_form(self, request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
        """The login page: nothing about the database is shown before login."""
        return self.render(
            request, "login.html", status=status, error=error, dsn="", refresh=0, auth_token=False
        )


def create_app(
    dsn: str,
    *,
    schema: str = "pgq",
    auth: Auth | None = None,
    settings: Settings | None = None,
) -> Starlette:
    """The dashboard as an ASGI app (serve it with uvicorn, or test it with httpx)."""
    auth = auth or Auth()
    data = Data(dsn, schema)
    dash = Dashboard(data, auth, settings or Settings())
    w = dash.wrap
    routes = [
        Route("/", w(dash.overview)),
        Route("/queue", w(dash.queue)),
        Route("/groups", w(dash.groups)),
        Route("/group", w(dash.group)),
        Route("/task", w(dash.task)),
        Route("/servers", w(dash.servers)),
        Route("/periodic", w(dash.periodic)),
        Route("/periodic/entry", w(dash.periodic_entry)),
        Route("/action", w(dash.action), methods=["POST"]),
        Route("/login", w(dash.login), methods=["GET", "POST"]),
        Route("/logout", w(dash.logout), methods=["POST"]),
        Route("/static/{name}", dash.static),
        Route("/favicon.ico", lambda request: RedirectResponse("/static/favicon.svg", status_code=301)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(data.close)

    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, auth=auth, login_page=dash.login_page)],
        lifespan=lifespan,
    )
    app.state.dashboard = dash
    return app

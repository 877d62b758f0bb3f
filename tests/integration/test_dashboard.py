"""The web dashboard over HTTP (Starlette's test client, a real PostgreSQL): every
page and action, escaping of user data, CSRF, confirmation, auth, Host checks,
and the DSN's password kept out of pages."""

from __future__ import annotations

import base64
import re
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed")
pytest.importorskip("jinja2", reason="the dashboard extra is not installed")

from psycopg.conninfo import conninfo_to_dict, make_conninfo

with warnings.catch_warnings():
    # Starlette >= 1.x prefers the httpx2 package for its test client; httpx works the same.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

import pgq
from pgq.dashboard import Auth, Settings, check_bind, create_app
from pgq.errors import ConfigError

BASE = "http://127.0.0.1"
XSS = ['<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "' onmouseover='alert(2)"]
CSRF_RE = re.compile(r'<meta name="pgq-csrf" content="([^"]+)">')


def make_client(dsn: str, auth: Auth | None = None, **settings: Any) -> TestClient:
    app = create_app(dsn, auth=auth, settings=Settings(**settings))
    return TestClient(app, base_url=BASE, follow_redirects=False)


@pytest.fixture
def client(dsn: str) -> Iterator[TestClient]:
    with make_client(dsn) as c:
        yield c


@pytest.fixture
def pgq_client(dsn: str) -> Iterator[pgq.Client]:
    with pgq.Client(dsn) as c:
        yield c


def csrf(client: TestClient, path: str = "/") -> str:
    r = client.get(path)
    m = CSRF_RE.search(r.text)
    assert m, f"no CSRF token on {path}"
    return m.group(1)


def act(client: TestClient, confirmed: bool = True, token: str | None = None, **fields: str) -> Any:
    data = dict(fields)
    data["csrf_token"] = token if token is not None else csrf(client)
    if confirmed:
        data["confirmed"] = "1"
    return client.post("/action", data=data)


def state_of(conn: psycopg.Connection[Any], task_id: str) -> str | None:
    row = conn.execute(
        "SELECT state FROM pgq.task WHERE coalesce(task_id, id::text) = %s", (task_id,)
    ).fetchone()
    return None if row is None else row["state"]


def make_active(conn: psycopg.Connection[Any], task_id: str, server: str = "host:1:abc") -> None:
    conn.execute(
        "UPDATE pgq.task SET state = 'active', locked_by = %s, attempt = attempt + 1, "
        "started_at = now(), lease_expires_at = now() + interval '30 s' WHERE id = %s::bigint",
        (server, task_id),
    )


def add_server(conn: psycopg.Connection[Any], server: str = "host:1:abc") -> None:
    conn.execute(
        "INSERT INTO pgq.server (id, host, pid, queues, concurrency) VALUES (%s, 'host', 1, %s, 4)",
        (server, '{"mail": 1}'),
    )


def aggregated(conn: psycopg.Connection[Any], queue: str, members: list[str]) -> str:
    """An aggregated task as the aggregator writes it (lineage in members)."""
    row = conn.execute(
        "INSERT INTO pgq.task (queue, type, payload, state, members) "
        "VALUES (%s, 'digest', '[1, 2]', 'pending', %s) RETURNING id",
        (queue, members),
    ).fetchone()
    assert row is not None
    return str(row["id"])


# -- pages --------------------------------------------------------------------------


def test_every_page_renders(
    client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    p = pgq_client.enqueue(pgq.Task("email:send", {"to": "a@example.com", "n": 1}), queue="mail")
    s = pgq_client.enqueue(pgq.Task("later", 1), queue="mail", process_in=3600)
    g = [pgq_client.enqueue(pgq.Task("msg", i), queue="mail", group="user1") for i in range(3)]
    agg = aggregated(conn, "mail", ["901", "902"])
    conn.execute(
        "INSERT INTO pgq.stat_daily (queue, day, processed, failed) VALUES ('mail', now()::date, 7, 2)"
    )
    add_server(conn)
    a = pgq_client.enqueue(pgq.Task("busy", {"x": 1}), queue="mail")
    make_active(conn, a.id)
    conn.execute(
        "INSERT INTO pgq.cron_entry (id, spec, location, type, payload) "
        "VALUES ('nightly', '0 3 * * *', 'UTC', 'report', '{}')"
    )

    r = client.get("/")
    assert r.status_code == 200
    assert 'data-queue="mail"' in r.text and "<svg" in r.text
    assert "7 in 14 days" in r.text and "2 in 14 days" in r.text  # throughput and failures
    assert "<title>" in r.text

    r = client.get("/queue", params={"queue": "mail"})
    assert r.status_code == 200 and 'data-state="pending"' in r.text
    r = client.get("/queue", params={"queue": "mail", "state": "pending"})
    assert f'data-task="{p.id}"' in r.text
    r = client.get("/queue", params={"queue": "mail", "state": "scheduled"})
    assert f'data-task="{s.id}"' in r.text
    r = client.get("/queue", params={"queue": "mail", "state": "aggregating"})
    assert all(f'data-task="{t.id}"' in r.text for t in g)

    r = client.get("/groups", params={"queue": "mail"})
    assert r.status_code == 200 and 'data-group="user1"' in r.text
    assert re.search(r'<td class="num size">3</td>', r.text)
    assert "newest + grace" in r.text

    r = client.get("/group", params={"queue": "mail", "group": "user1"})
    assert r.status_code == 200 and all(f'data-task="{t.id}"' in r.text for t in g)
    r = client.get("/group", params={"queue": "mail", "group": "nobody"})
    assert r.status_code == 200 and 'id="group-empty"' in r.text

    r = client.get("/task", params={"queue": "mail", "id": p.id})
    assert r.status_code == 200
    assert "&#34;to&#34;: &#34;a@example.com&#34;" in r.text  # pretty-printed JSON, escaped
    assert re.search(r"\n  &#34;n&#34;: 1,?\n", r.text)
    r = client.get("/task", params={"queue": "mail", "id": agg})
    assert "aggregates 2 members" in r.text and ">901</a>" in r.text

    r = client.get("/servers")
    assert r.status_code == 200 and 'data-server="host:1:abc"' in r.text and f'data-task="{a.id}"' in r.text
    assert 'value="task_cancel"' in r.text

    r = client.get("/periodic")
    assert r.status_code == 200 and 'data-entry="nightly"' in r.text
    r = client.get("/periodic/entry", params={"id": "nightly"})
    assert r.status_code == 200 and "0 3 * * *" in r.text

    for path in ("/static/app.js", "/static/app.css"):
        assert client.get(path).status_code == 200
    assert client.get("/static/nope.js").status_code == 404


def test_security_headers(client: TestClient) -> None:
    r = client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text.replace('<script src="/static/app.js" defer></script>', "")


def test_task_detail_shows_errors_retries_result_and_headers(
    client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    t = pgq_client.enqueue(pgq.Task("job", {"k": "v"}, headers={"trace": "abc123"}), queue="q", max_retry=4)
    conn.execute(
        "UPDATE pgq.task SET state = 'retry', retried = 2, last_error = 'boom: division by zero', "
        "last_failed_at = now(), run_at = now() + interval '1 min' WHERE id = %s::bigint",
        (t.id,),
    )
    r = client.get("/task", params={"queue": "q", "id": t.id})
    assert "boom: division by zero" in r.text and "2 of max 4" in r.text and "abc123" in r.text
    r = client.get("/queue", params={"queue": "q", "state": "retry"})
    assert "boom: division by zero" in r.text and "2/4" in r.text

    c = pgq_client.enqueue(pgq.Task("job2", 1), queue="q", retention=3600)
    conn.execute(
        "UPDATE pgq.task SET state = 'completed', completed_at = now(), result = '{\"rows\": 3}' "
        "WHERE id = %s::bigint",
        (c.id,),
    )
    r = client.get("/task", params={"queue": "q", "id": c.id})
    assert 'id="result"' in r.text and "&#34;rows&#34;: 3" in r.text


def test_lineage_both_ways(client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    waiting = pgq_client.enqueue(pgq.Task("m", 1), queue="q", group="g1")
    r = client.get("/task", params={"queue": "q", "id": waiting.id})
    assert "Waiting in group" in r.text and "group=g1" in r.text

    agg = aggregated(conn, "q", ["501", "502", "my-id"])
    for member in ("501", "my-id"):
        r = client.get("/task", params={"queue": "q", "id": member})
        assert r.status_code == 200
        assert 'id="aggregate-link"' in r.text and f"id={agg}" in r.text
        assert "aggregated into task" in r.text
    r = client.get("/task", params={"queue": "q", "id": "999999"})
    assert r.status_code == 404 and "No task 999999" in r.text


def test_pagination_and_search(dsn: str, pgq_client: pgq.Client) -> None:
    infos = pgq_client.enqueue_many([pgq.Task("t", i) for i in range(25)], queue="big")
    with make_client(dsn, page_size=10) as client:
        r = client.get("/queue", params={"queue": "big", "state": "pending"})
        assert "page 1 of 3" in r.text and r.text.count("data-task=") == 10 and 'rel="next"' in r.text
        r = client.get("/queue", params={"queue": "big", "state": "pending", "page": 3})
        assert r.text.count("data-task=") == 5 and 'rel="prev"' in r.text and 'rel="next"' not in r.text
        assert f'data-task="{infos[-1].id}"' in r.text
        r = client.get("/queue", params={"queue": "big", "id": f" {infos[3].id} "})
        assert r.status_code == 303 and r.headers["location"] == f"/task?queue=big&id={infos[3].id}"
        for bad in ({"page": "0"}, {"page": "x"}, {"state": "done"}):
            r = client.get("/queue", params={"queue": "big", **bad})
            assert r.status_code == 400, bad
        assert client.get("/queue", params={"queue": "nope"}).status_code == 404
        assert client.get("/queue").status_code == 400
        assert client.get("/", params={"days": "9999"}).status_code == 400


# -- escaping -----------------------------------------------------------------------


def test_user_data_is_escaped_everywhere(
    client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    ids = []
    for i, evil in enumerate(XSS):
        queue = f"q{i}{evil}"
        t = pgq_client.enqueue(
            pgq.Task(f"type{evil}", {"html": evil, evil: [evil]}, headers={evil: evil}),
            queue=queue,
            task_id=f"id-{i}{evil}",
        )
        g = pgq_client.enqueue(pgq.Task("m", evil), queue=queue, group=f"grp{evil}")
        conn.execute(
            "UPDATE pgq.task SET state = 'archived', last_error = %s, last_failed_at = now(), result = %s "
            "WHERE task_id = %s",
            (evil, psycopg.types.json.Jsonb(evil), t.id),
        )
        conn.execute(
            "UPDATE pgq.task_group SET errors = 1, last_error = %s, last_error_at = now() WHERE queue = %s",
            (evil, queue),
        )
        add_server(conn, f"srv{i}{evil}")
        make_active(conn, g.id, f"srv{i}{evil}")
        g2 = pgq_client.enqueue(pgq.Task("m", evil), queue=queue, group=f"grp{evil}")
        conn.execute(
            "INSERT INTO pgq.cron_entry (id, spec, location, type, payload) VALUES (%s, %s, 'UTC', %s, %s)",
            (f"e{i}{evil}", f"@every 1h{evil}", evil, psycopg.types.json.Jsonb({evil: evil})),
        )
        ids.append((queue, t.id, f"grp{evil}", g2.id, f"e{i}{evil}"))

    pages = [("/", {}), ("/servers", {}), ("/periodic", {})]
    for queue, tid, group, gid, entry in ids:
        pages += [
            ("/queue", {"queue": queue}),
            ("/queue", {"queue": queue, "state": "archived"}),
            ("/queue", {"queue": queue, "state": "active"}),
            ("/queue", {"queue": queue, "state": "aggregating"}),
            ("/groups", {"queue": queue}),
            ("/group", {"queue": queue, "group": group}),
            ("/task", {"queue": queue, "id": tid}),
            ("/task", {"queue": queue, "id": gid}),
            ("/task", {"queue": queue, "id": f"missing{XSS[0]}"}),
            ("/periodic/entry", {"id": entry}),
        ]
    token = csrf(client)
    seen_escaped = 0
    for path, params in pages:
        r = client.get(path, params=params)
        assert r.status_code in (200, 404), (path, params, r.status_code)
        body = r.text
        assert "<script>alert" not in body, (path, params)
        assert "<img src=x" not in body, (path, params)
        assert "' onmouseover='" not in body, (path, params)
        seen_escaped += body.count("&lt;script&gt;alert(") + body.count("&lt;img src=x onerror")
    assert seen_escaped > 30
    # the confirmation page echoes the names too
    queue, tid, group, _, _ = ids[1]
    r = act(client, confirmed=False, token=token, action="task_delete", queue=queue, id=tid)
    assert r.status_code == 200 and "<img src=x" not in r.text and "&lt;img src=x" in r.text
    r = act(client, confirmed=False, token=token, action="group_delete_all", queue=queue, group=group)
    assert "<img src=x" not in r.text
    # an error message that quotes user data is escaped as well
    r = client.get("/queue", params={"queue": XSS[0]})
    assert r.status_code == 404 and "<script>alert" not in r.text


# -- actions ------------------------------------------------------------------------


def test_action_needs_confirmation(
    client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    t = pgq_client.enqueue(pgq.Task("x", 1), queue="q")
    token = csrf(client)
    r = act(client, confirmed=False, token=token, action="task_delete", queue="q", id=t.id)
    assert r.status_code == 200 and 'id="confirm-text"' in r.text and "cannot be undone" in r.text
    assert state_of(conn, t.id) == "pending"
    m = re.search(r'name="confirmed" value="1"', r.text)
    assert m, "the confirmation page posts confirmed=1"
    r = act(client, token=token, action="task_delete", queue="q", id=t.id)
    assert r.status_code == 303 and state_of(conn, t.id) is None


def test_post_without_or_with_bad_csrf_is_refused(
    client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    t = pgq_client.enqueue(pgq.Task("x", 1), queue="q")
    fields = {"action": "task_delete", "queue": "q", "id": t.id, "confirmed": "1"}
    good = csrf(client)
    cases = [
        ({}, {}),  # no token
        ({"csrf_token": "forged"}, {}),
        ({"csrf_token": good[:-1] + ("0" if good[-1] != "0" else "1")}, {}),
        ({"csrf_token": good}, {"origin": "http://evil.example"}),  # cross-site
        ({"csrf_token": good}, {"origin": "null"}),
    ]
    for extra, headers in cases:
        r = client.post("/action", data={**fields, **extra}, headers=headers)
        assert r.status_code == 403, (extra, headers)
        assert state_of(conn, t.id) == "pending"
    # a token is bound to its cookie: another browser's cookie does not match
    with make_client(client.app.state.dashboard.data.dsn) as other:
        other.get("/")
        other.cookies.set("pgq_csrf", "attacker-cookie")
        r = other.post("/action", data={**fields, "csrf_token": good})
        assert r.status_code == 403 and state_of(conn, t.id) == "pending"
    # GET never acts
    assert client.get("/action", params=fields).status_code == 405
    r = client.post("/action", data={**fields, "csrf_token": good}, headers={"origin": BASE})
    assert r.status_code == 303 and state_of(conn, t.id) is None


def test_task_actions(client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    s = pgq_client.enqueue(pgq.Task("x", 1), queue="q", process_in=3600)
    r = act(client, action="task_run", queue="q", id=s.id, back=f"/task?queue=q&id={s.id}")
    assert r.status_code == 303 and r.headers["location"] == f"/task?queue=q&id={s.id}"
    assert state_of(conn, s.id) == "pending"
    page = client.get(r.headers["location"])
    assert f"task {s.id} is now pending" in page.text and 'class="flash ok"' in page.text
    assert "is now pending" not in client.get("/").text  # the message is shown once

    assert act(client, action="task_archive", queue="q", id=s.id).status_code == 303
    assert state_of(conn, s.id) == "archived"
    r = act(client, action="task_delete", queue="q", id=s.id, back=f"/task?queue=q&id={s.id}")
    assert r.headers["location"] == "/queue?queue=q" and state_of(conn, s.id) is None

    a = pgq_client.enqueue(pgq.Task("busy", 1), queue="q")
    make_active(conn, a.id)
    with psycopg.connect(client.app.state.dashboard.data.dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgq_cancel")
        r = act(client, action="task_cancel", queue="q", id=a.id)
        assert r.status_code == 303
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.payload for n in notes] == [a.id]
    # a wrong state gives a clear message, not a crash
    r = act(client, action="task_archive", queue="q", id=a.id)
    page = client.get(r.headers["location"])
    assert 'class="flash error"' in page.text and "cannot archive" in page.text
    r = act(client, action="task_cancel", queue="q", id="424242")
    assert "no task" in client.get(r.headers["location"]).text


def test_bulk_group_and_queue_actions(
    client: TestClient, pgq_client: pgq.Client, conn: psycopg.Connection[Any]
) -> None:
    for _ in range(3):
        pgq_client.enqueue(pgq.Task("x", 1), queue="q", process_in=3600)
    r = act(client, action="state_run_all", queue="q", state="scheduled")
    assert "3 tasks now pending" in client.get(r.headers["location"]).text
    assert act(client, action="state_archive_all", queue="q", state="pending").status_code == 303
    assert conn.execute("SELECT count(*) AS n FROM pgq.task WHERE state = 'archived'").fetchone() == {"n": 3}
    act(client, action="state_delete_all", queue="q", state="archived")
    assert conn.execute("SELECT count(*) AS n FROM pgq.task").fetchone() == {"n": 0}
    r = act(client, action="state_run_all", queue="q", state="pending")
    assert "cannot run pending tasks" in client.get(r.headers["location"]).text

    for grp in ("g1", "g2", "g3"):
        for i in range(2):
            pgq_client.enqueue(pgq.Task("m", i), queue="q", group=grp)
    act(client, action="group_run_all", queue="q", group="g1")
    act(client, action="group_archive_all", queue="q", group="g2")
    r = act(client, action="group_delete_all", queue="q", group="g3")
    assert "2 tasks deleted" in client.get(r.headers["location"]).text
    rows = conn.execute(
        "SELECT group_key, state, count(*) AS n FROM pgq.task GROUP BY 1, 2 ORDER BY 1"
    ).fetchall()
    assert rows == [
        {"group_key": "g1", "state": "pending", "n": 2},
        {"group_key": "g2", "state": "archived", "n": 2},
    ]

    act(client, action="queue_pause", queue="q")
    assert conn.execute("SELECT paused FROM pgq.queue WHERE name = 'q'").fetchone() == {"paused": True}
    assert "paused</span>" in client.get("/").text
    act(client, action="queue_unpause", queue="q")
    assert conn.execute("SELECT paused FROM pgq.queue WHERE name = 'q'").fetchone() == {"paused": False}
    r = act(client, action="queue_pause", queue="nope")
    assert "does not exist" in client.get(r.headers["location"]).text


def test_bad_action_requests(client: TestClient) -> None:
    assert act(client, action="drop_everything", queue="q").status_code == 400
    assert act(client, action="task_run", queue="q").status_code == 400  # no id
    # back= never leaves the site
    for back in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        r = act(client, action="queue_pause", queue="q", back=back)
        assert r.headers["location"] == "/queue?queue=q", back


def test_read_only(dsn: str, pgq_client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    t = pgq_client.enqueue(pgq.Task("x", 1), queue="q")
    with make_client(dsn, read_only=True) as client:
        page = client.get("/queue", params={"queue": "q", "state": "pending"})
        assert 'action="/action"' not in page.text
        token = CSRF_RE.search(page.text)
        assert token is not None
        r = act(client, token=token.group(1), action="task_delete", queue="q", id=t.id)
        assert r.status_code == 403 and state_of(conn, t.id) == "pending"


# -- auth, binding, secrets -----------------------------------------------------------


def test_check_bind() -> None:
    none = Auth()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, none)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ConfigError, match="without authentication"):
            check_bind(host, none)
        check_bind(host, Auth(token="a-long-token"))
        check_bind(host, Auth(basic=("u", "p")))
    with pytest.raises(ConfigError, match="at least 8"):
        Auth(token="short")


def test_host_header_checked_without_auth(dsn: str) -> None:
    with make_client(dsn) as client:
        assert client.get("/", headers={"host": "evil.example"}).status_code == 400
        assert client.get("/", headers={"host": "localhost:8080"}).status_code == 200
        assert client.get("/", headers={"host": "[::1]:8080"}).status_code == 200
    with make_client(dsn, auth=Auth(token="a-long-token")) as client:
        r = client.get("/", headers={"host": "dash.example", "authorization": "Bearer a-long-token"})
        assert r.status_code == 200


def test_token_auth(dsn: str, pgq_client: pgq.Client, conn: psycopg.Connection[Any]) -> None:
    t = pgq_client.enqueue(pgq.Task("x", 1), queue="q")
    with make_client(dsn, auth=Auth(token="s3cret-token")) as client:
        for path in ("/", "/queue?queue=q", "/servers", "/periodic", f"/task?queue=q&id={t.id}"):
            r = client.get(path)
            assert r.status_code == 401 and 'name="token"' in r.text, path
            assert "pgq_t_" not in r.text  # nothing about the database before login
        r = client.post("/action", data={"action": "task_delete", "queue": "q", "id": t.id, "confirmed": "1"})
        assert r.status_code == 401 and state_of(conn, t.id) == "pending"
        assert client.get("/", headers={"authorization": "Bearer wrong-token"}).status_code == 401
        assert client.get("/", headers={"authorization": "Bearer s3cret-token"}).status_code == 200

        token = csrf(client, "/login")
        r = client.post("/login", data={"token": "wrong", "csrf_token": token})
        assert r.status_code == 401 and "wrong token" in r.text
        assert client.post("/login", data={"token": "s3cret-token"}).status_code == 403  # no CSRF
        r = client.post("/login", data={"token": "s3cret-token", "csrf_token": token})
        assert r.status_code == 303
        assert "s3cret-token" not in r.headers["set-cookie"]
        assert client.get("/").status_code == 200
        r = act(client, action="task_delete", queue="q", id=t.id)
        assert r.status_code == 303 and state_of(conn, t.id) is None

        client.post("/logout", data={"csrf_token": csrf(client)})
        assert client.get("/").status_code == 401


def test_basic_auth(dsn: str) -> None:
    with make_client(dsn, auth=Auth(basic=("admin", "pa:ss"))) as client:
        r = client.get("/")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        good = "Basic " + base64.b64encode(b"admin:pa:ss").decode()
        bad = "Basic " + base64.b64encode(b"admin:nope").decode()
        assert client.get("/", headers={"authorization": good}).status_code == 200
        assert client.get("/", headers={"authorization": bad}).status_code == 401
        assert client.get("/", headers={"authorization": "Basic !!!"}).status_code == 401
        assert client.post("/action", data={"action": "queue_pause", "queue": "q"}).status_code == 401


def _with_password(dsn: str, password: str, dbname: str | None = None) -> str:
    params = conninfo_to_dict(dsn)
    params["password"] = password
    if dbname:
        params["dbname"] = dbname
    return make_conninfo("", **params)


def test_dsn_password_never_shown(dsn: str, pgq_client: pgq.Client, caplog: pytest.LogCaptureFixture) -> None:
    # The test server trusts local connections, so any password connects.
    password = "Tr0ub4dor-pw-XYZ"
    t = pgq_client.enqueue(pgq.Task("x", 1), queue="q", group="g")
    with make_client(_with_password(dsn, password)) as client:
        paths = [
            "/",
            "/queue?queue=q",
            "/groups?queue=q",
            "/group?queue=q&group=g",
            f"/task?queue=q&id={t.id}",
        ]
        paths += ["/servers", "/periodic", "/queue?queue=nope", "/task?queue=q&id=nope"]
        for path in paths:
            r = client.get(path)
            assert r.status_code in (200, 404)
            assert password not in r.text, path
        assert "password=***" in client.get("/").text
    # a database that cannot be reached: the error page and the log name no password
    with make_client(_with_password(dsn, password, "pgq_no_such_db_x")) as client:
        r = client.get("/")
        assert r.status_code == 503 and "database error" in r.text and password not in r.text
    assert password not in caplog.text

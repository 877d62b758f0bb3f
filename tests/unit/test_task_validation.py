"""Validation of everything an enqueue takes, without a database.

`build_params` is what both clients call before any SQL is sent; every bad input
must raise a specific pgq error here (the integration tests prove the caller's
transaction stays usable).
"""

from __future__ import annotations

import decimal
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import pgq
from pgq.client import build_params
from pgq.task import MAX_NAME_LENGTH, MAX_PAYLOAD_BYTES, MAX_PAYLOAD_DEPTH, encode_payload, parse_duration

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def params(task: pgq.Task, **opts: Any) -> dict[str, Any]:
    return build_params([(task, opts)])


def test_defaults() -> None:
    p = params(pgq.Task("t", {"a": 1}))
    assert p["queue"] == ["default"]
    assert p["type"] == ["t"]
    assert p["payload"] == ['{"a":1}']
    assert p["max_retry"] == [25]
    assert p["group_key"] == [None]
    assert p["headers"] == [None]
    for k in ("task_id", "timeout", "deadline", "retention", "unique_ttl", "process_at", "process_in"):
        assert p[k] == [None], k


def test_every_option_is_encoded() -> None:
    p = params(
        pgq.Task("t", [1, "x"], headers={"trace": "abc"}),
        queue="q",
        group="g",
        max_retry=3,
        timeout=timedelta(seconds=30),
        deadline=NOW,
        unique="1h",
        process_in=1.5,
        task_id="custom-1",
        retention=timedelta(days=1),
    )
    assert p["queue"] == ["q"] and p["group_key"] == ["g"] and p["max_retry"] == [3]
    assert p["timeout"] == [30.0] and p["deadline"] == [NOW] and p["unique_ttl"] == [3600.0]
    assert p["process_in"] == [1.5] and p["process_at"] == [None]
    assert p["task_id"] == ["custom-1"] and p["retention"] == [86400.0]
    assert json.loads(p["headers"][0]) == {"trace": "abc"}


def test_enqueue_options_override_the_tasks_own() -> None:
    t = pgq.Task("t", None, queue="a", group="g", max_retry=1, process_in=5)
    p = params(t, queue="b", max_retry=7, process_in=None)
    assert p["queue"] == ["b"] and p["max_retry"] == [7] and p["group_key"] == ["g"]
    # None means "not given": the task's own option stays
    assert p["process_in"] == [5.0]


def test_none_options_mean_defaults() -> None:
    p = params(pgq.Task("t"), queue=None, max_retry=None)
    assert p["queue"] == ["default"] and p["max_retry"] == [25]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (timedelta(minutes=2), 120.0),
        (3, 3.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


# --- bad input: each raises a specific error --------------------------------------------------

BAD_NAMES = [
    ("", "blank"),
    ("   ", "blank"),
    ("\t\n", "blank"),
    ("a\x00b", "NUL"),
    ("x" * (MAX_NAME_LENGTH + 1), "limit"),
    ("a\ud800", "surrogate"),
    (42, "must be a str"),
]


@pytest.mark.parametrize(("value", "msg"), BAD_NAMES)
@pytest.mark.parametrize("field", ["queue", "type", "group", "task_id"])
def test_bad_names(field: str, value: Any, msg: str) -> None:
    with pytest.raises(pgq.InvalidName, match=msg) as ei:
        if field == "type":
            params(pgq.Task(value))
        else:
            params(pgq.Task("t"), **{field: value})
    assert isinstance(ei.value, pgq.PgqError) and isinstance(ei.value, ValueError)
    assert field.replace("type", "task type") in str(ei.value)


def test_name_at_the_limit_is_accepted() -> None:
    name = "x" * MAX_NAME_LENGTH
    assert params(pgq.Task(name), queue=name, group=name, task_id=name)["queue"] == [name]


def test_all_digit_task_id_is_rejected() -> None:
    with pytest.raises(pgq.InvalidName, match="all digits"):
        params(pgq.Task("t"), task_id="123")
    assert params(pgq.Task("t"), task_id="123a")["task_id"] == ["123a"]


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


BAD_PAYLOADS: list[tuple[Any, type[Exception], str]] = [
    (float("nan"), pgq.InvalidPayloadError, "nan"),
    ({"x": float("inf")}, pgq.InvalidPayloadError, "inf"),
    ([float("-inf")], pgq.InvalidPayloadError, "inf"),
    ("a\x00b", pgq.InvalidPayloadError, "NUL"),
    ({"k\x00": 1}, pgq.InvalidPayloadError, "NUL"),
    ("\ud800", pgq.InvalidPayloadError, "surrogate"),
    ({"\udfff": 1}, pgq.InvalidPayloadError, "surrogate"),
    (b"bytes", pgq.PayloadTypeError, "bytes"),
    ({1, 2}, pgq.PayloadTypeError, "set"),
    (NOW, pgq.PayloadTypeError, "datetime"),
    (decimal.Decimal("1.5"), pgq.PayloadTypeError, "Decimal"),
    ({1: "a"}, pgq.PayloadTypeError, "keys must be str"),
    ({("a",): 1}, pgq.PayloadTypeError, "keys must be str"),
    (_deep(5000), pgq.InvalidPayloadError, "nested deeper"),
    (object(), pgq.PayloadTypeError, "object"),
]


@pytest.mark.parametrize(("payload", "exc", "msg"), BAD_PAYLOADS)
def test_bad_payloads(payload: Any, exc: type[Exception], msg: str) -> None:
    with pytest.raises(exc, match=msg) as ei:
        params(pgq.Task("t", payload))
    assert isinstance(ei.value, pgq.EnqueueError)


def test_payload_errors_are_value_or_type_errors() -> None:
    assert issubclass(pgq.InvalidPayloadError, ValueError)
    assert issubclass(pgq.PayloadTypeError, TypeError)
    assert issubclass(pgq.PayloadTooLargeError, pgq.InvalidPayloadError)


def test_nesting_at_the_limit_is_accepted() -> None:
    encode_payload(_deep(MAX_PAYLOAD_DEPTH - 1))


def test_payload_over_the_size_limit() -> None:
    big = "x" * (MAX_PAYLOAD_BYTES - 1)  # + 2 quotes: one byte over
    with pytest.raises(pgq.PayloadTooLargeError, match=str(MAX_PAYLOAD_BYTES)):
        params(pgq.Task("t", big))
    params(pgq.Task("t", big[:-1]))  # exactly at the limit


def test_payload_size_counts_utf8_bytes() -> None:
    big = "é" * (MAX_PAYLOAD_BYTES // 2)  # 2 bytes each
    with pytest.raises(pgq.PayloadTooLargeError):
        params(pgq.Task("t", big))


def test_good_payloads() -> None:
    payload: Any
    for payload in (None, True, 0, -1.5, "s", "é\u2028", [], {}, {"a": [1, {"b": None}]}, (1, 2), 2**70):
        params(pgq.Task("t", payload))


@pytest.mark.parametrize(
    ("opts", "exc", "msg"),
    [
        ({"max_retry": -1}, pgq.InvalidArgumentError, ">= 0"),
        ({"max_retry": 1.5}, pgq.InvalidArgumentError, "int"),
        ({"max_retry": True}, pgq.InvalidArgumentError, "int"),
        ({"max_retry": 2**31}, pgq.InvalidArgumentError, "too large"),
        ({"process_at": NOW, "process_in": 5}, pgq.InvalidArgumentError, "not both"),
        ({"process_at": datetime(2030, 1, 1)}, pgq.InvalidArgumentError, "naive"),
        ({"deadline": datetime(2030, 1, 1)}, pgq.InvalidArgumentError, "naive"),
        ({"process_at": "2030-01-01"}, pgq.InvalidArgumentError, "datetime"),
        ({"process_in": -1}, pgq.InvalidArgumentError, "negative"),
        ({"process_in": timedelta(seconds=-1)}, pgq.InvalidArgumentError, "negative"),
        ({"timeout": 0}, pgq.InvalidArgumentError, "positive"),
        ({"timeout": -5}, pgq.InvalidArgumentError, "positive"),
        ({"timeout": timedelta(0)}, pgq.InvalidArgumentError, "positive"),
        ({"unique": 0}, pgq.InvalidArgumentError, "positive"),
        ({"unique": timedelta(seconds=-1)}, pgq.InvalidArgumentError, "positive"),
        ({"retention": -1}, pgq.InvalidArgumentError, "negative"),
        ({"timeout": float("nan")}, pgq.InvalidArgumentError, "finite"),
        ({"timeout": float("inf")}, pgq.InvalidArgumentError, "finite"),
        ({"timeout": "soon"}, pgq.InvalidArgumentError, "duration"),
        ({"timeout": True}, pgq.InvalidArgumentError, "bool"),
        ({"timeout": [1]}, pgq.InvalidArgumentError, "timedelta"),
    ],
)
def test_bad_options(opts: dict[str, Any], exc: type[Exception], msg: str) -> None:
    with pytest.raises(exc, match=msg):
        params(pgq.Task("t"), **opts)
    # the same options carried by the Task itself are checked the same way
    with pytest.raises(exc, match=msg):
        params(pgq.Task("t", **opts))


def test_unknown_option_names() -> None:
    with pytest.raises(pgq.InvalidArgumentError, match="did you mean 'max_retry'") as ei:
        params(pgq.Task("t"), max_retries=3)
    assert isinstance(ei.value, TypeError)  # like any unexpected keyword
    with pytest.raises(pgq.InvalidArgumentError, match="unknown option"):
        pgq.Task("t", qeue="x")
    with pytest.raises(pgq.InvalidArgumentError, match="conn"):
        pgq.Task("t", conn=None)


@pytest.mark.parametrize("headers", [{"k": 1}, {1: "v"}, ["k", "v"], {"k": "a\x00"}, {"k": "\ud800"}])
def test_bad_headers(headers: Any) -> None:
    with pytest.raises(pgq.EnqueueError):
        params(pgq.Task("t", headers=headers))


def test_not_a_task() -> None:
    with pytest.raises(pgq.InvalidArgumentError, match=r"pgq\.Task"):
        build_params([("t", {})])  # type: ignore[list-item]


def test_nothing_to_enqueue() -> None:
    with pytest.raises(pgq.InvalidArgumentError, match="nothing"):
        build_params([])


def test_duplicates_within_one_batch() -> None:
    with pytest.raises(pgq.TaskIDConflictError, match="twice"):
        build_params([(pgq.Task("t"), {"task_id": "a"}), (pgq.Task("u"), {"task_id": "a"})])
    # the same task_id in two queues is fine
    build_params([(pgq.Task("t"), {"task_id": "a"}), (pgq.Task("u"), {"task_id": "a", "queue": "q2"})])
    # unique tasks equal as JSON (whatever the key order) conflict within a batch
    with pytest.raises(pgq.DuplicateTaskError):
        build_params(
            [
                (pgq.Task("t", {"a": 1, "b": 2}), {"unique": 60}),
                (pgq.Task("t", {"b": 2, "a": 1}), {"unique": 60}),
            ]
        )


def test_circular_payload() -> None:
    a: list[Any] = []
    a.append(a)
    with pytest.raises(pgq.InvalidPayloadError, match="nested deeper"):
        params(pgq.Task("t", a))


def test_encoding_is_compact_json() -> None:
    assert encode_payload({"a": [1, 2.5, None, True], "é": "x\n"}) == '{"a":[1,2.5,null,true],"é":"x\\n"}'
    assert (
        encode_payload("s") == '"s"'
        and encode_payload(None) == "null"
        and encode_payload(10**20) == str(10**20)
    )

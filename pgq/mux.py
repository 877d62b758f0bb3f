"""ServeMux: route tasks to handlers by type, the longest registered prefix winning.

As in Asynq, a pattern matches a task type equal to it or starting with it;
among the patterns that match, the longest wins. Middleware (`mux.use`) wraps
every handler, the first registered outermost: `mw(next_handler) -> handler`.
A handler is `def handler(task)` (run in the worker's thread pool) or
`async def handler(task)` (run on the event loop). A type that no pattern
matches is a handler failure, retried like any error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from pgq.task import Task

Handler = Callable[[Task], Any]
Middleware = Callable[[Handler], Handler]
H = TypeVar("H", bound=Handler)


class HandlerNotFound(Exception):
    """No pattern of the ServeMux matches the task's type."""


def is_async_handler(fn: Any) -> bool:
    """True when calling fn returns a coroutine: run it on the event loop."""
    while hasattr(fn, "func") and not inspect.isfunction(fn):  # functools.partial
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


class ServeMux:
    """A task multiplexer: `mux.handle(pattern, handler)` or `@mux.handle(pattern)`."""

    def __init__(self) -> None:
        self._patterns: dict[str, Handler] = {}
        self._middleware: list[Middleware] = []
        self._cache: dict[str, tuple[Handler, bool] | None] = {}

    @overload
    def handle(self, pattern: str, handler: None = None) -> Callable[[H], H]: ...
    @overload
    def handle(self, pattern: str, handler: H) -> H: ...

    def handle(self, pattern: str, handler: Handler | None = None) -> Any:
        """Register `handler` for task types equal to or starting with `pattern`."""
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"ServeMux.handle: pattern must be a non-blank str, got {pattern!r}")
        if handler is None:

            def decorator(fn: H) -> H:
                self.handle(pattern, fn)
                return fn

            return decorator
        if not callable(handler):
            raise TypeError(f"ServeMux.handle: handler for {pattern!r} must be callable, got {handler!r}")
        if pattern in self._patterns:
            raise ValueError(f"ServeMux.handle: pattern {pattern!r} is already registered")
        self._patterns[pattern] = handler
        self._cache.clear()
        return handler

    def use(self, *middleware: Middleware) -> None:
        """Add middleware; each wraps the handler chosen for a task (first added is outermost)."""
        for mw in middleware:
            if not callable(mw):
                raise TypeError(f"ServeMux.use: middleware must be callable, got {mw!r}")
        self._middleware.extend(middleware)
        self._cache.clear()

    def match(self, task_type: str) -> Handler | None:
        """The registered handler for a type (no middleware), or None."""
        h = self._patterns.get(task_type)
        if h is not None:
            return h
        best = None
        for pattern in self._patterns:
            if task_type.startswith(pattern) and (best is None or len(pattern) > len(best)):
                best = pattern
        return None if best is None else self._patterns[best]

    def resolve(self, task_type: str) -> tuple[Handler, bool] | None:
        """(the handler wrapped in the middleware, whether it is async), or None. Cached."""
        try:
            return self._cache[task_type]
        except KeyError:
            pass
        h = self.match(task_type)
        out: tuple[Handler, bool] | None = None
        if h is not None:
            for mw in reversed(self._middleware):
                h = mw(h)
            out = (h, is_async_handler(h))
        if len(self._cache) < 10_000:
            self._cache[task_type] = out
        return out

    def process_task(self, task: Task) -> Any:
        """Run the handler for `task` (a coroutine for async handlers); HandlerNotFound if none."""
        r = self.resolve(task.type)
        if r is None:
            raise HandlerNotFound(f"no handler registered for task type {task.type!r}")
        return r[0](task)

    def __repr__(self) -> str:
        return f"<pgq.ServeMux patterns={sorted(self._patterns)}>"

"""pgq's web dashboard: see and operate queues, groups and tasks in a browser.

`pgq dashboard` serves it (pip install 'pgq-jobs[dashboard]'); `create_app`
gives the ASGI app to embed or test. It is built on pgq.Inspector, the
Scheduler's listings and the read-only queries of sql/queries/dashboard.sql.
See docs/dashboard.md.
"""

from __future__ import annotations

from pgq.dashboard.app import Settings, create_app
from pgq.dashboard.security import Auth, check_bind, is_loopback, parse_basic_auth

__all__ = ["Auth", "Settings", "check_bind", "create_app", "is_loopback", "parse_basic_auth"]

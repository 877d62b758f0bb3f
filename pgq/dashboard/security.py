"""Who may see and operate the dashboard, and how requests are checked.

- **Binding.** The dashboard binds 127.0.0.1 by default. `check_bind` refuses
  any address that is not loopback unless a token or basic auth is set.
- **Host header.** Without auth, only loopback host names are served (a DNS
  rebinding page cannot drive a dashboard bound to 127.0.0.1).
- **Auth.** With a token: `Authorization: Bearer <token>`, or a session cookie
  that the login form sets (an HMAC of the token under this process's secret,
  so it ends with the process). With basic auth: the browser's own prompt.
  Secrets are compared in constant time.
- **CSRF.** Every POST carries `csrf_token`, an HMAC of the `pgq_csrf` cookie
  (random, HttpOnly, SameSite=Strict) under the process's secret; a request
  whose token does not match, or whose Origin is another site, gets 403.
- **Headers.** A strict Content-Security-Policy (scripts only from /static),
  no framing, no sniffing, same-origin referrers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pgq.errors import ConfigError

CSRF_COOKIE = "pgq_csrf"
SESSION_COOKIE = "pgq_session"
CSRF_FIELD = "csrf_token"

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_basic_auth(value: str | None) -> tuple[str, str] | None:
    """'user:pass' -> (user, pass); None stays None."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--basic-auth must be USER:PASSWORD with both parts non-empty")
    return user, password


@dataclass
class Auth:
    """The dashboard's credentials and its per-process secret."""

    token: str | None = None
    basic: tuple[str, str] | None = None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("the dashboard token must be at least 8 characters long")

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.basic is not None

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self.secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    # -- authentication -------------------------------------------------------------

    def session_value(self) -> str:
        assert self.token is not None
        return self._mac("session", self.token)

    def token_matches(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def allows(self, authorization: str | None, session: str | None) -> bool:
        """Whether a request with these credentials may pass (always, when auth is off)."""
        if not self.enabled:
            return True
        if self.token is not None and session and hmac.compare_digest(session, self.session_value()):
            return True
        if not authorization:
            return False
        scheme, _, cred = authorization.partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        if scheme == "bearer" and self.token is not None:
            return self.token_matches(cred)
        if scheme == "basic" and self.basic is not None:
            try:
                user, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            ok_user = hmac.compare_digest(user.encode(), self.basic[0].encode())
            ok_pass = hmac.compare_digest(password.encode(), self.basic[1].encode())
            return ok_user and ok_pass
        return False

    # -- CSRF -----------------------------------------------------------------------

    def csrf_token(self, cookie: str) -> str:
        return self._mac("csrf", cookie)

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        return hmac.compare_digest(token, self.csrf_token(cookie))


def new_csrf_cookie() -> str:
    return secrets.token_urlsafe(32)


def check_bind(host: str, auth: Auth) -> None:
    """Refuse a non-loopback address unless auth is configured."""
    if not is_loopback(host) and not auth.enabled:
        raise ConfigError(
            f"refusing to bind the dashboard to {host!r} without authentication: "
            "pass --token or --basic-auth (or bind 127.0.0.1)"
        )


def host_allowed(host_header: str | None, auth: Auth) -> bool:
    """Without auth only loopback Host headers are served (DNS rebinding)."""
    if auth.enabled:
        return True
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return is_loopback(name)


def origin_ok(origin: str | None, host_header: str | None) -> bool:
    """A POST's Origin (when the browser sends one) must be this very host."""
    if origin is None:
        return True
    if origin == "null" or not host_header:
        return False
    return urlsplit(origin).netloc.lower() == host_header.strip().lower()


def safe_back(path: str | None, default: str) -> str:
    """A local path to go back to after an action; anything else gives default."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return default
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        return default
    return path

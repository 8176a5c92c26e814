"""Who may use the dashboard and the admin API, and CSRF protection for its forms.

Rules:
- With `UNDERSTUDY_ADMIN_TOKEN` set, every `/dashboard` page needs the session cookie set by the
  login form, and every `/api/` call needs `Authorization: Bearer <token>` (or that cookie).
- Without a token the dashboard is served only when the proxy listens on a loopback address, and
  then only to requests whose `Host` is a loopback name (so a DNS-rebinding page cannot reach it).
  On any other address it is off, and `mount_dashboard` logs why.
- Every state-changing form carries a CSRF token: an HMAC of a random per-browser nonce kept in an
  HttpOnly, SameSite=Strict cookie. A POST whose `Origin` is another site is refused. The JSON API
  takes only `application/json` bodies, which a cross-site page cannot send without a CORS
  preflight, and the proxy grants none.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import Request

from proxy.config import Settings

SESSION_COOKIE = "understudy_session"
CSRF_COOKIE = "understudy_csrf"
SESSION_TTL_S = 7 * 24 * 3600


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (brackets allowed); False for anything else,
    including wildcard addresses such as 0.0.0.0 and hostnames that only might resolve locally."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    return urlsplit("//" + host_header).hostname or ""


def _sign(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


class FailedAttempts:
    """Wrong admin tokens per client address, in a sliding window.

    After `limit` failures within `window_s` seconds an address is refused (see `retry_after`)
    until its oldest failure in the window is older than `window_s`; a right token clears its
    count. At most `max_addresses` addresses are tracked (the least recently failing are
    forgotten first), so memory stays bounded whatever the number of addresses.
    """

    def __init__(self, limit: int, window_s: float, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str, now: float | None = None) -> int:
        """Seconds (rounded up, at least 1) before `address` may try again; 0: it may now."""
        now = time.monotonic() if now is None else now
        times = self._recent(address, now)
        if times is None or len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[-self.limit] + self.window_s - now))

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one wrong token from `address`."""
        now = time.monotonic() if now is None else now
        times = self._recent(address, now) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """A right token from `address`: forget its failures."""
        self._failures.pop(address, None)


def client_address(request: Request) -> str:
    """The address of the peer that sent `request` (the socket's; no forwarded header)."""
    return request.client.host if request.client else "unknown"


@dataclass(frozen=True)
class Guard:
    """The dashboard's access rules, made once from the settings (see the module docstring).

    token: the admin token or None. listen_host: the address the proxy listens on. key: HMAC key
    for session and CSRF values (derived from the token, so sessions outlive a restart and end
    when the token changes; random per process without a token). attempts: wrong tokens per
    client address (the admin API and the login form refuse an address that made too many).
    """

    token: str | None
    listen_host: str
    key: bytes
    attempts: FailedAttempts = field(
        default_factory=lambda: FailedAttempts(10, 60.0), compare=False, repr=False
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        """The guard for `settings.admin_token` and `settings.host`."""
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        token = token or None
        key = (
            hashlib.sha256(b"understudy-dashboard-v1\0" + token.encode()).digest()
            if token
            else secrets.token_bytes(32)
        )
        attempts = FailedAttempts(settings.admin_max_failures, settings.admin_failure_window_s)
        return cls(token=token, listen_host=settings.host, key=key, attempts=attempts)

    @property
    def enabled(self) -> bool:
        """Is the dashboard served at all."""
        return self.token is not None or is_loopback(self.listen_host)

    @property
    def disabled_reason(self) -> str | None:
        """Why the dashboard is off (one line, for the log and for the refusal), or None."""
        if self.enabled:
            return None
        return (
            f"the dashboard and /api/ are off: the proxy listens on {self.listen_host}, which is "
            "not a loopback address, and UNDERSTUDY_ADMIN_TOKEN is not set; set it to serve them"
        )

    # -- sessions (login cookie) ---------------------------------------------------------------

    def check_token(self, candidate: str) -> bool:
        """Constant-time comparison of a submitted token with the admin token."""
        if self.token is None:
            return False
        return hmac.compare_digest(candidate.encode(), self.token.encode())

    def new_session(self, now: float | None = None) -> str:
        """A session cookie value: expiry (unix seconds) and its HMAC; never the token itself."""
        expiry = int((now if now is not None else time.time()) + SESSION_TTL_S)
        return f"{expiry}.{_sign(self.key, f'session:{expiry}')}"

    def valid_session(self, value: str | None, now: float | None = None) -> bool:
        """Is `value` a session cookie this guard made, not yet expired."""
        if not value or "." not in value:
            return False
        expiry_text, signature = value.split(".", 1)
        if not expiry_text.isdigit():
            return False
        if int(expiry_text) < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(signature, _sign(self.key, f"session:{expiry_text}"))

    def valid_bearer(self, authorization: str | None) -> bool:
        """Is `authorization` the header `Bearer <admin token>`."""
        if not authorization or self.token is None:
            return False
        scheme, _, credentials = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.check_token(credentials.strip())

    def authenticated(self, request: Request) -> bool:
        """May `request` read and curate: no token configured, a valid session or Bearer token."""
        if self.token is None:
            return True
        return self.valid_bearer(request.headers.get("authorization")) or self.valid_session(
            request.cookies.get(SESSION_COOKIE)
        )

    def host_allowed(self, request: Request) -> bool:
        """Without a token, only loopback `Host` names are served (DNS-rebinding defence)."""
        if self.token is not None:
            return True
        return is_loopback(_host_name(request.headers.get("host", "")))

    # -- CSRF ----------------------------------------------------------------------------------

    @staticmethod
    def new_nonce() -> str:
        """A fresh per-browser nonce for the CSRF cookie."""
        return secrets.token_urlsafe(24)

    def csrf_token(self, nonce: str) -> str:
        """The form token that goes with the cookie `nonce`."""
        return _sign(self.key, f"csrf:{nonce}")

    @staticmethod
    def same_origin(request: Request) -> bool:
        """False when the request carries an `Origin` (or, failing that, `Referer`) of another
        host:port than its own `Host`."""
        origin = request.headers.get("origin") or request.headers.get("referer")
        if not origin or origin == "null":
            return origin is None
        return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()

    def valid_csrf(self, request: Request, submitted: str | None) -> bool:
        """Does a form POST carry the token for its CSRF cookie, from this site."""
        nonce = request.cookies.get(CSRF_COOKIE)
        if not nonce or not submitted or not self.same_origin(request):
            return False
        return hmac.compare_digest(submitted, self.csrf_token(nonce))

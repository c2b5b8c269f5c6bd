"""Who may talk to the UI, and what a browser may do with it.

    bind        127.0.0.1 by default; any other address needs a token (a run can read any file the
                user can, and start processes), so `check_bind` (net.check_ui_bind) refuses to start without one
    auth        a token, sent as `Authorization: Bearer T` (scripts) or as the session cookie the
                login form sets (HttpOnly, SameSite=Strict: page scripts cannot read it, other
                sites cannot send it). The cookie is a random id this process remembers, with an
                expiry: logging out (or restarting the UI) ends it, and it says nothing about the
                token. Wrong tokens (form or bearer) are throttled per client address.
    Host        without a token only loopback names are accepted, so a DNS-rebinding page that
                resolves its own name to 127.0.0.1 cannot read the API
    CSRF        POST/DELETE from a browser must come from this origin (Origin, else Referer, equals
                Host) and carry the X-CSRF-Token header that only this origin's pages can read;
                a bearer-token request is not a browser's, so it needs neither
    headers     CSP default-src 'self' (nothing from a CDN, no inline script), nosniff, no framing
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..errors import UserError
from ..net import MIN_SECRET, is_loopback
from ..net import check_ui_bind as check_bind  # check_bind: the name ui.app.main and the tests use

COOKIE = "qlora_kit_session"
CSRF_HEADER = "x-csrf-token"
MIN_TOKEN = MIN_SECRET
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
# Reachable without a token: the login form and what it needs to look like a page.
PUBLIC = ("/login", "/static/app.css", "/static/login.css", "/favicon.ico")
SESSION_TTL = 12 * 3600  # a browser session outlives a working day's runs, not the week
LOGIN_FAILURES, LOGIN_WINDOW = 5, 60.0  # wrong tokens per client per minute; the next attempt waits
LOGIN_FORM_MAX = 4096


def read_token(token_file: Path | None) -> str | None:
    if token_file is None:
        return None
    p = Path(token_file).expanduser()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UserError(f"--token-file {p}: cannot read it ({e.strerror or e})",
                        "write a secret into the file, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > ui.token`") from None
    check_token(token, f"--token-file {p}")
    return token


def check_token(token: str, where: str = "the token") -> None:
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise UserError(f"{where}: a token needs at least {MIN_TOKEN} characters and no spaces",
                        "generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))'")


class Sessions:
    """Login sessions: random ids held by this process, each with an expiry. A fixed value derived
    from the token would survive logout; these end on logout, on expiry and with the process."""

    def __init__(self, ttl: float = SESSION_TTL, cap: int = 1000):
        self.ttl, self.cap = ttl, cap
        self._ids: dict[str, float] = {}  # id -> monotonic expiry
        self._lock = threading.Lock()

    def new(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, exp in self._ids.items() if exp <= now]:
                del self._ids[old]
            if len(self._ids) >= self.cap:  # bounded memory: the oldest login goes first
                del self._ids[min(self._ids, key=self._ids.__getitem__)]
            self._ids[sid] = now + self.ttl
        return sid

    def valid(self, sid: str) -> bool:
        with self._lock:
            exp = self._ids.get(sid) if sid else None
            if exp is not None and exp <= time.monotonic():
                del self._ids[sid]
                exp = None
        return exp is not None

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._ids.pop(sid or "", None)


class Throttle:
    """At most `limit` wrong tokens per client address in `window` seconds; then it must wait."""

    def __init__(self, limit: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW, cap: int = 10000):
        self.limit, self.window, self.cap = limit, window, cap
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            q = self._fails.get(client)
            while q and q[0] <= now - self.window:
                q.popleft()
            if q is not None and not q:
                del self._fails[client]
            return q[0] + self.window - now if q and len(q) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._fails) >= self.cap:  # bounded memory: forget clients whose last failure is old
                for k in [k for k, q in self._fails.items() if not q or q[-1] <= now - self.window]:
                    del self._fails[k]
            self._fails.setdefault(client, deque(maxlen=self.limit)).append(now)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._fails.pop(client, None)


def session_cookie(sid: str, ttl: float = SESSION_TTL) -> str:
    return f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/; Max-Age={int(ttl)}"


def session_of(headers: dict[str, str]) -> str:
    return _cookies(headers.get("cookie", "")).get(COOKIE, "")


def _client(scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url).netloc.lower() or None
    except ValueError:
        return None


def _split_host(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookies(raw: str) -> dict[str, str]:
    out = {}
    for part in raw.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


class Guard:
    """ASGI middleware: Host, auth, same-origin + CSRF for state changes, security headers.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses (chat, zip downloads) pass
    through untouched."""

    def __init__(self, app, token: str | None, csrf: str | None = None, login_page: bytes = b"",
                 sessions: Sessions | None = None, throttle: Throttle | None = None):
        self.app = app
        self.token = token
        self.sessions = sessions or Sessions()
        self.throttle = throttle or Throttle()
        self.csrf = csrf or secrets.token_urlsafe(32)
        self.login_page = login_page

    def authenticated(self, headers: dict[str, str], client: str = "?") -> tuple[bool, bool]:
        """(authenticated, by bearer token). A wrong bearer token counts as a failed login."""
        if self.token is None:
            return True, False
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            if hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
                return True, True
            self.throttle.failed(client)
        return self.sessions.valid(session_of(headers)), False

    def same_origin(self, headers: dict[str, str]) -> bool:
        host = headers.get("host", "").lower()
        origin = headers.get("origin")
        if origin is not None:
            return _host_of(origin) == host
        referer = headers.get("referer")
        return referer is not None and _host_of(referer) == host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        api = path.startswith("/api/")

        async def send_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [h for h in HEADERS if h[0] not in have]
                if b"content-security-policy" not in have:
                    extra.append((b"content-security-policy", CSP.encode()))
                if api and b"cache-control" not in have:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        # without a token the ui serves loopback only; a Host that is not a loopback name or address
        # is a foreign name resolving here (DNS rebinding). Any loopback address counts, as for the bind
        if self.token is None and not is_loopback(_split_host(headers.get("host", "")).lower()):
            return await _reply(send_headers, 403, {"error": "unexpected Host header",
                                                    "hint": "open the UI at http://127.0.0.1:PORT/"})
        client = _client(scope)
        if self.token is not None and headers.get("authorization", "").lower().startswith("bearer "):
            wait = self.throttle.wait(client)
            if wait:  # guessing the token by script is throttled like guessing it in the form
                return await _reply(send_headers, 429, {"error": "too many wrong tokens from this address",
                                                        "hint": f"wait {wait:.0f} s"},
                                    extra=[(b"retry-after", str(int(wait) + 1).encode())])
        ok, bearer = self.authenticated(headers, client)
        if path == "/login" and self.token is not None:
            if method != "POST":
                return await _reply(send_headers, 200, self.login_page, "text/html; charset=utf-8")
            if not self.same_origin(headers):  # no CSRF token before login; the origin must still be ours
                return await _reply(send_headers, 403, {"error": "cross-site request refused (Origin/Referer is not this server)"})
            return await self.login(scope, receive, send_headers, headers, client)
        if not ok and path not in PUBLIC:
            if api or method not in SAFE_METHODS:
                return await _reply(send_headers, 401, {"error": "not logged in", "hint": "open / and enter the token"},
                                    extra=[(b"www-authenticate", b'Bearer realm="qlora-kit"')])
            return await _reply(send_headers, 401, self.login_page, "text/html; charset=utf-8")
        if method not in SAFE_METHODS and not bearer:
            if not self.same_origin(headers):
                return await _reply(send_headers, 403, {"error": "cross-site request refused (Origin/Referer is not this server)"})
            if not hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(), self.csrf.encode()):
                return await _reply(send_headers, 403, {"error": "missing or wrong X-CSRF-Token header",
                                                        "hint": "reload the page"})
        return await self.app(scope, receive, send_headers)

    def _login_page(self, message: str) -> bytes:
        return self.login_page.replace(b"<!--error-->", f'<p class="error" role="alert">{message}</p>'.encode())

    async def login(self, scope, receive, send, headers: dict[str, str], client: str):
        wait = self.throttle.wait(client)
        if wait:  # checked before the token is even read: a correct guess in the wait does not count
            return await _reply(send, 429, self._login_page(f"Too many wrong tokens. Try again in {wait:.0f} s."),
                                "text/html; charset=utf-8", extra=[(b"retry-after", str(int(wait) + 1).encode())])
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > LOGIN_FORM_MAX:
            return await _reply(send, 413, {"error": "login form too large"})
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > LOGIN_FORM_MAX:
                return await _reply(send, 413, {"error": "login form too large"})
            if not msg.get("more_body"):
                break
        given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self.throttle.failed(client)
            return await _reply(send, 401, self._login_page("Wrong token."), "text/html; charset=utf-8")
        self.throttle.succeeded(client)
        self.sessions.end(session_of(headers))  # a fresh id at every login: a planted one is worthless
        cookie = session_cookie(self.sessions.new(), self.sessions.ttl)
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def _reply(send, status: int, body, content_type: str = "application/json", extra=()):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})

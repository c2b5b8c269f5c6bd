"""Who may talk to the UI, and what a browser may do with it.

    bind        127.0.0.1 by default; any other address needs a token (a run can read any file the
                user can, and start processes), so `check_bind` refuses to start without one
    auth        a token, sent as `Authorization: Bearer T` (scripts) or as the session cookie the
                login form sets (HttpOnly, SameSite=Strict: page scripts cannot read it, other
                sites cannot send it)
    Host        without a token only loopback names are accepted, so a DNS-rebinding page that
                resolves its own name to 127.0.0.1 cannot read the API
    CSRF        POST/DELETE from a browser must come from this origin (Origin, else Referer, equals
                Host) and carry the X-CSRF-Token header that only this origin's pages can read;
                a bearer-token request is not a browser's, so it needs neither
    headers     CSP default-src 'self' (nothing from a CDN, no inline script), nosniff, no framing
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..errors import UserError
from ..serve import is_loopback

COOKIE = "qlora_kit_session"
CSRF_HEADER = "x-csrf-token"
MIN_TOKEN = 16
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
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


def check_bind(host: str, token: str | None) -> None:
    """Anything but loopback is reachable from other machines: refuse it without a token."""
    if token is None and not is_loopback(host):
        raise UserError(
            f"refusing to listen on {host} without a token: anyone who can reach this address could read your "
            "data and start processes as you",
            "pass --token-file FILE (a secret of 16+ characters; the login page asks for it), or use the default "
            "--host 127.0.0.1 and reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 HOST)")


def session_value(token: str) -> str:
    # the cookie carries a value derived from the token, not the token itself
    return hmac.new(token.encode(), b"qlora-kit-ui-session", hashlib.sha256).hexdigest()


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

    def __init__(self, app, token: str | None, csrf: str | None = None, login_page: bytes = b""):
        self.app = app
        self.token = token
        self.session = session_value(token) if token else None
        self.csrf = csrf or secrets.token_urlsafe(32)
        self.login_page = login_page

    def authenticated(self, headers: dict[str, str]) -> tuple[bool, bool]:
        """(authenticated, by bearer token)."""
        if self.token is None:
            return True, False
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True, True
        cookie = _cookies(headers.get("cookie", "")).get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session.encode()), False

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

        if self.token is None and _split_host(headers.get("host", "")).lower() not in LOOPBACK_NAMES:
            return await _reply(send_headers, 403, {"error": "unexpected Host header",
                                                    "hint": "open the UI at http://127.0.0.1:PORT/"})
        ok, bearer = self.authenticated(headers)
        if path == "/login" and self.token is not None:
            if method != "POST":
                return await _reply(send_headers, 200, self.login_page, "text/html; charset=utf-8")
            if not self.same_origin(headers):  # no CSRF token before login; the origin must still be ours
                return await _reply(send_headers, 403, {"error": "cross-site request refused (Origin/Referer is not this server)"})
            return await self.login(scope, receive, send_headers)
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

    async def login(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > 4096:
                return await _reply(send, 413, {"error": "login form too large"})
            if not msg.get("more_body"):
                break
        given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            page = self.login_page.replace(b"<!--error-->", b'<p class="error" role="alert">Wrong token.</p>')
            return await _reply(send, 401, page, "text/html; charset=utf-8")
        cookie = f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def _reply(send, status: int, body, content_type: str = "application/json", extra=()):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})

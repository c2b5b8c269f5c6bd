"""Who may reach a server this package starts, and how much a client may send it: the rules
`qlora-kit serve` (the OpenAI-compatible API) and `qlora-kit ui` (the web app) share.

    is_loopback(host)            reachable from this machine only
    check_serve_bind(host, key)  serve off loopback needs an API key of MIN_SECRET+ characters
    check_ui_bind(host, token)   the ui off loopback needs a token (its length is checked where it is read)
    body_chunks / read_body      a request body capped at a limit, by Content-Length and while reading

Both servers let whoever reaches them act as the user (use the models and read their system prompts;
read the user's files and start processes), so off loopback a secret is all that stands between a
network and this machine. Neither Starlette nor uvicorn limits a body's size, so both cap it here.
"""

from __future__ import annotations

import ipaddress

from .errors import UserError

MIN_SECRET = 16  # characters of an API key or ui token: not guessable in the throttled attempts either allows


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) or localhost: reachable from this machine only."""
    h = host.strip().strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_serve_bind(host: str, api_key: str | None) -> None:
    """Off loopback anyone who can reach the port could use the models and read every adapter's
    system prompt (/v1/models): refuse to start without a key that cannot be guessed."""
    if is_loopback(host):
        return
    hint = ("write a secret of 16+ characters into a file and pass --api-key-file FILE, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > serve.key`; or keep the default "
            "--host 127.0.0.1 and reach it through an SSH tunnel")
    if not api_key:
        raise UserError(f"refusing to serve on {host} without an API key: anyone who can reach it could use the "
                        "models and read their system prompts", hint)
    if len(api_key) < MIN_SECRET:
        raise UserError(f"refusing to serve on {host} with an API key of {len(api_key)} characters: off this machine "
                        f"it needs at least {MIN_SECRET}", hint)


def check_ui_bind(host: str, token: str | None) -> None:
    """Anything but loopback is reachable from other machines: refuse it without a token (a run can
    read any file the user can, and start processes)."""
    if token is None and not is_loopback(host):
        raise UserError(
            f"refusing to listen on {host} without a token: anyone who can reach this address could read your "
            "data and start processes as you",
            "pass --token-file FILE (a secret of 16+ characters; the login page asks for it), or use the default "
            "--host 127.0.0.1 and reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 HOST)")


def body_chunks(request, limit: int, too_large):
    """The body's chunks (an async iterator), refused with `raise too_large()` at once by its
    Content-Length, before any of it is read, or, when it is streamed (chunked), as soon as it passes
    `limit`. For every body a client may send, in serve and in the web UI: neither Starlette nor uvicorn
    limits a body's size (uvicorn does answer a Content-Length that is not digits with 400 itself)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large()

    async def capped():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise too_large()
            yield chunk

    return capped()


async def read_body(request, limit: int, too_large) -> bytearray:
    """The whole body (see body_chunks): memory never holds more than `limit`."""
    buf = bytearray()
    async for chunk in body_chunks(request, limit, too_large):
        buf += chunk
    return buf

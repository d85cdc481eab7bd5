"""Starting and stopping ``gpt serve`` cleanly: the listening socket, the key, the shutdown.

Everything that can stop the server from starting is checked before the
checkpoint loads and before uvicorn runs, and is one line and exit 2 (a
:class:`NanoGPTError`): an empty API key, a host that does not resolve, a port
in use or not ours to take. The socket bound here is the one uvicorn serves on,
so no other process can take the port in between. At SIGTERM, requests still
running when ``--grace`` ends are cut: one line says how many, where uvicorn
would log a ``CancelledError`` traceback for each.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from typing import Any

from nanogpt_core.errors import NanoGPTError


def check_api_key(api_key: str | None) -> None:
    """Refuse an empty key: it would silently switch authentication off."""
    if api_key is not None and not api_key.strip():
        raise NanoGPTError(
            "--api-key (or NANOGPT_API_KEY) is empty: give a key, or leave both unset "
            "to serve without one"
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or one line saying why not.

    As uvicorn binds: IPv6 when the host has a colon, ``SO_REUSEADDR`` so a
    restart does not wait for the old connections' TIME_WAIT.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"--host {host} --port {port}"
    try:
        # Resolved apart from binding, so that a name that does not resolve is told apart.
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    except socket.gaierror as exc:
        raise NanoGPTError(
            f"--host {host}: cannot resolve it ({exc.strerror}); give an address such as "
            "127.0.0.1 (this machine) or 0.0.0.0 (every interface)"
        ) from exc
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise NanoGPTError(f"{where}: {_bind_problem(exc)}") from exc
    sock.set_inheritable(True)
    return sock


def _bind_problem(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is in use by another program; stop it or choose another --port"
    if exc.errno == errno.EACCES:
        return "no permission to listen there (ports below 1024 need root); choose --port 1024 or above"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address; use 127.0.0.1 or 0.0.0.0"
    return f"cannot listen there ({exc.strerror or exc})"


class CutAtShutdown:
    """ASGI middleware: a request cancelled at the end of ``--grace`` ends quietly.

    uvicorn cancels the requests still running when the graceful shutdown times
    out and logs each cancellation's traceback; :func:`quiet_uvicorn`'s one line
    says how many were cut instead. Nothing else cancels a request's task (a
    client that disconnects ends a stream through the response itself).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the request; a cancellation ends it without a traceback."""
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise  # the lifespan's own cancellation is uvicorn's business


class _GraceLine(logging.Filter):
    """Turns uvicorn's lines about requests cut at shutdown into our own one line.

    uvicorn says "Cancel N running task(s)" as an error, then, for each request
    that :class:`CutAtShutdown` ended, that it "returned without completing
    response": both are what ``--grace`` is for, not errors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cutting = False

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop it) for uvicorn's lines about cut requests; True for the rest."""
        message = record.getMessage()
        if message.startswith("Cancel ") and "graceful shutdown" in message:
            self.cutting = True
            count = record.args[0] if isinstance(record.args, tuple) and record.args else "some"
            print(
                f"stopping: --grace ended; {count} request(s) still running were cut",
                file=sys.stderr,
                flush=True,
            )
            return False
        return not (self.cutting and message.startswith("ASGI callable returned without"))


def quiet_uvicorn() -> None:
    """Our own line for the requests cut at shutdown, in place of uvicorn's ``ERROR:`` one."""
    logging.getLogger("uvicorn.error").addFilter(_GraceLine())

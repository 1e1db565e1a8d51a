"""The TUI in a browser: `testbed tui FILE --serve` serves it with textual-serve (the Textual
project's server). Each browser tab that opens the page starts its own `testbed tui FILE`
process, driven over a websocket; closing the tab quits it (a run's teardown included).

Anyone who can open the page can do what the TUI does, as the user who serves it (as root:
bring up cells). So it listens on loopback unless told otherwise, and every page lives
under a random token in the path (printed once, like a notebook server's): another local
user, or a page elsewhere that guesses the port, gets 404. The page loads nothing from
outside this server (textual-serve's own page asks Google Fonts for its font).
"""

from __future__ import annotations

import ipaddress
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

from testbed.errors import InputError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "check_host", "page_url", "serve", "served_command"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_TEMPLATES = Path(__file__).parent / "web"


def check_host(host: str) -> tuple[str, str | None]:
    """(the address to listen on, a warning or None). An IP address (or `localhost`);
    anything but loopback gets a warning: the page has no login beyond its token."""
    if host == "localhost":
        return "127.0.0.1", None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InputError(f"--host {host!r}: give an IP address to listen on (default {DEFAULT_HOST}, loopback only)") \
            from None
    if addr.is_loopback:
        return str(addr), None
    return str(addr), (f"--host {addr}: the TUI is reachable from other machines; whoever has the URL (with its "
                       "token) can select, run and kill devices as this user")


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: give a TCP port between 1 and 65535 (default {DEFAULT_PORT})")
    return port


def served_command(tui_args: list[str]) -> str:
    """The shell command textual-serve starts per browser tab: this interpreter's
    `testbed tui` with the same arguments, less the serving ones (quoted: it goes to a shell)."""
    return shlex.join([sys.executable, "-m", "testbed.cli", "tui", *tui_args])


def page_url(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/{token}/"


def serve(command: str, host: str, port: int, *, title: str = "testbed tui", token: str | None = None,
          on_ready: Any = None) -> None:
    """Serve `command` until Ctrl-C (or SIGTERM); prints the page's URL through `on_ready`."""
    from aiohttp import web
    import aiohttp_jinja2
    import jinja2
    from textual_serve.server import Server

    token = token or secrets.token_urlsafe(16)
    url = page_url(host, port, token)
    # textual-serve's server, its page and websocket under /<token>/ (its handlers build
    # their links from these route names)
    server = Server(command, host=host, port=port, title=title, public_url=url.rsplit(f"/{token}/", 1)[0],
                    templates_path=_TEMPLATES)
    app = web.Application()
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(server.templates_path))
    app.add_routes([
        web.get(f"/{token}/", server.handle_index, name="index"),
        web.get(f"/{token}/ws", server.handle_websocket, name="websocket"),
        web.static("/static", server.statics_path, name="static"),
    ])

    def listening(_banner: str) -> None:  # aiohttp calls it once the socket listens (on_startup is earlier)
        if on_ready is not None:
            on_ready(url)

    server.initialize_logging()
    web.run_app(app, host=host, port=port, print=listening)  # Ctrl-C / SIGTERM end it; each tab's TUI quits

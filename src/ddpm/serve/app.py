"""The HTTP side of the web server: who may use it (Host and Origin), the Starlette routes, the
listening socket and :class:`WebServer`, which runs the app on uvicorn beside an engine."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from ..pipeline import Pipeline
from .engine import Engine
from .events import EventStream
from .requests import Limits, RequestError, model_info, parse_body, parse_request, shown

# A request is a few hundred bytes; a larger body is refused (413) before it is read in full.
MAX_BODY_BYTES = 2**20
SERVE_EXTRA = "pip install 'ddpm[serve]'"


# A Host header or an Origin's authority: a name or an IP literal, and maybe a port.
AUTHORITY = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::([0-9]{1,5}))?")


def authority(text: str) -> tuple[str, int] | None:
    """``'Host:port'`` as (lower-case name or normalised IP, port; 80 when none), or None."""
    match = AUTHORITY.fullmatch(text.strip().lower())
    if match is None:
        return None
    name = match.group(1).strip("[]")
    with contextlib.suppress(ValueError):
        name = str(ipaddress.ip_address(name))
    return name, int(match.group(2) or 80)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Served:
    """The addresses this server answers to: the Host a request must name, and the origin a
    request that starts work may come from. The port is always the bound one. Bound to loopback:
    localhost, 127.0.0.1 and [::1] (and the --host given). Bound to every address (0.0.0.0,
    ::): any IP literal (an IP in the address bar is the visitor's own choice, never a site's
    name pointed here), localhost and this machine's host name; reach it under another name by
    binding --host to that name. Bound to one address or name: that name and its address."""

    where: str  # the addresses it answers to, in words, for messages
    port: int
    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def bound(cls, host: str, address: str, port: int, url: str) -> Served:
        ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope id is not in a Host
        names = {str(ip), *(a[0] for a in [authority(host)] if a)}
        if ip.is_loopback or ip.is_unspecified:
            names |= {"localhost", "127.0.0.1", "::1"}
        where = url
        if ip.is_unspecified:
            names.add(socket.gethostname().lower())
            where = (f"an IP address of this machine, localhost or {socket.gethostname()}, at "
                     f"port {port} (e.g. {url})")
        return cls(where, port, frozenset(names), any_ip=ip.is_unspecified)

    def admits(self, text: str) -> bool:
        """Whether a Host header (or an Origin's host and port) names this server."""
        parsed = authority(text)
        return parsed is not None and parsed[1] == self.port and (
            parsed[0] in self.names or (self.any_ip and _is_ip(parsed[0])))

    def refusal(self, method: str, headers: Any) -> RequestError | None:
        """Why a request with these headers is not served, or None. A state-changing request
        (anything but GET and HEAD) may come from no page but this server's own."""
        hosts = headers.getlist("host")
        if len(hosts) != 1 or not self.admits(hosts[0]):
            given = f"Host {shown(hosts[0])}" if len(hosts) == 1 else f"{len(hosts)} Host headers"
            return RequestError(f"{given} is not this server's address: it answers only to "
                                f"{self.where}, so that other sites' pages cannot reach it; open "
                                f"it there", 421)
        origin = headers.get("origin")
        if method not in ("GET", "HEAD") and origin is not None:
            scheme, sep, rest = origin.partition("://")
            if not (scheme.lower() == "http" and sep and authority(rest) == authority(hosts[0])):
                return RequestError(f"a page from {shown(origin)} may not use this server; "
                                    f"open {self.where} and use its page", 403)
        return None


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, or RequestError 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is over {limit} bytes; the settings are a "
                               f"small JSON object such as {{\"steps\": 20}}", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_post(query: str, content_type: str) -> None:
    """RequestError unless a generate request carries its settings as a JSON body. Only a JSON
    POST starts work: a form or a text/plain fetch from another site (a request a browser sends
    without asking this server first) is refused."""
    if query:  # settings there would be ignored: say so instead
        raise RequestError(f"POST /api/generate takes its settings as a JSON body, not in the "
                           f"query string (got {shown('?' + query)})")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        raise RequestError(f"send the settings as JSON with Content-Type: application/json, not "
                           f"{shown(content_type) if content_type else 'none'}", 415)


def not_served_message(method: str, path: str, status: int, headers: Any) -> str:
    """The message of a 404 (no such path) or a 405 (a method the path does not take)."""
    if status == 405:
        allowed = {m.strip() for m in headers.get("Allow", "GET").split(",")}
        return f"{method} {shown(path)} is not allowed; use {' or '.join(sorted(allowed - {'HEAD'}))}"
    return (f"nothing at {shown(path)}; there are /, /api/model, /api/status, /api/generate (POST) "
            f"and /api/jobs/ID/grid.png or denoising.gif")


def create_app(engine: Engine, source: str, served: Served) -> Any:
    """The Starlette application of one engine (one model), answering only requests that
    ``served`` admits."""
    try:
        from starlette.applications import Starlette
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import HTMLResponse, JSONResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise ValueError(f"'ddpm serve' needs Starlette and uvicorn: {SERVE_EXTRA}") from None

    page = resources.files("ddpm").joinpath("web/index.html").read_text(encoding="utf-8")
    info = model_info(engine.pipe, source, engine.limits, engine.stages)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def model(request: Request) -> Response:
        return JSONResponse(info)

    async def status(request: Request) -> Response:
        return JSONResponse(engine.status())

    async def generate(request: Request) -> Any:
        try:
            check_json_post(request.url.query, request.headers.get("content-type", ""))
            body = parse_body(await read_body(request))
            job = engine.submit(parse_request(body, engine.pipe, engine.limits),
                                asyncio.get_running_loop())
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        except ClientDisconnect:  # gone before its body came: no one to answer
            return Response(status_code=400)
        return EventStream(engine, job)

    async def download(request: Request) -> Response:
        job, name = request.path_params["job"], request.path_params["name"]
        # The id is read here, not by a route convertor: int() of a 5,000-digit id raises.
        files = engine.results.get(int(job)) if job.isdigit() and len(job) < 19 else None
        if files is None or name not in files:
            what = (f"no file {shown(name)}; there are grid.png and denoising.gif" if files else
                    f"generation {shown(job)} is not among those this server keeps (the newest "
                    f"{len(engine.results)}); generate it again")
            return JSONResponse({"error": what}, 404)
        media = "image/png" if name.endswith(".png") else "image/gif"
        return Response(files[name], media_type=media, headers={
            "content-disposition": f'attachment; filename="ddpm-{job}-{name}"'})

    async def not_served(request: Request, exc: HTTPException) -> Response:
        """404 and 405 as the API's other refusals: JSON with a message."""
        what = not_served_message(request.method, request.url.path, exc.status_code,
                                  exc.headers or {})
        return JSONResponse({"error": what}, exc.status_code, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        engine.close()

    # (Starlette calls not_served only with HTTPException, the type it is registered for.)
    app = Starlette(routes=[
        Route("/", index), Route("/api/model", model), Route("/api/status", status),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/jobs/{job}/{name}", download),
    ], exception_handlers={HTTPException: not_served}, lifespan=lifespan)  # type: ignore[dict-item]

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        refusal = scope["type"] == "http" and served.refusal(scope["method"],
                                                             Headers(scope=scope))
        if refusal:
            await JSONResponse({"error": str(refusal)}, refusal.status)(scope, receive, send)
        else:
            await app(scope, receive, send)

    return guarded


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or ValueError saying what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host or repr(host)}: not an address of this machine "
                         f"({exc.strerror}); give 127.0.0.1, 0.0.0.0 or a name that "
                         f"resolves") from None
    family = infos[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        hint = ("choose another --port, or --port 0 for any free one"
                if exc.errno == 98 else "choose another --host or --port")
        # os.strerror: create_server's own strerror repeats the address in Python's words
        why = os.strerror(exc.errno) if exc.errno else exc.strerror
        raise ValueError(f"cannot listen on {host}:{port}: {why}; {hint}") from None


class WebServer:
    """``ddpm serve``'s server: the app on uvicorn, on a socket bound at construction (so its
    port is known before it serves). ``serve_forever`` blocks until Ctrl+C (the command);
    ``start`` serves from threads and ``stop`` ends it (tests, notebooks).

    uvicorn always runs on a thread of its own and the generations on ``serve_forever``'s
    (the main) thread: measured here, bf16 sampling on a CPU ran 25% slower on a thread that is
    not the main one (fp32 5%)."""

    def __init__(self, pipe: Pipeline, source: str, limits: Limits, *, host: str = "127.0.0.1",
                 port: int = 7860, stages: Sequence[Pipeline] = ()):
        try:
            import uvicorn
        except ImportError:
            raise ValueError(f"'ddpm serve' needs Starlette and uvicorn: {SERVE_EXTRA}") from None
        if limits.max_steps is None:
            limits = replace(limits, max_steps=pipe.schedule.num_train_timesteps)
        limits.check(pipe.schedule.num_train_timesteps)
        self.socket = bind(host, port)
        address, bound_port = self.socket.getsockname()[:2]
        self.engine = Engine(pipe, limits, stages)
        self.app = create_app(self.engine, source, Served.bound(host, address, bound_port,
                                                                self.url))
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def serve_forever(self) -> None:
        self._start_http()
        try:
            self.engine.run()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def start(self) -> WebServer:
        self._start_http()
        self.engine.start()
        return self

    def _start_http(self) -> None:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name="ddpm-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.engine.close()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()

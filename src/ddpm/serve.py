"""``ddpm serve``: a web page to sample a trained model and watch it denoise.

One page (``web/index.html``) and a small JSON API, served by Starlette on uvicorn (the
``[serve]`` extra)::

    GET  /                        the page
    GET  /api/model               the model, the sample settings it takes and this server's limits
    GET  /api/status              the running generation, those waiting, what has finished
    POST /api/generate            JSON settings -> 400 with {"error": ...} for a bad value, or a
                                  text/event-stream of events: queued (generations ahead), started,
                                  frame (x_t and, asked for, the predicted x0 as PNG grids), then
                                  done (the grid) | error | cancelled
    GET  /api/jobs/ID/grid.png    a finished generation's grid; /api/jobs/ID/denoising.gif its
                                  reverse process (the newest few are kept, see Limits.keep_bytes)

Every answer goes only to a request addressed to this server (its Host, see :class:`Served`), and
a generation starts only from a JSON POST of no other site's page (its Origin): a page elsewhere
cannot reach a server on loopback by pointing its own name at 127.0.0.1 (DNS rebinding), nor
start work here with a form or a 'simple' cross-origin request (CSRF). A refusal, like every
bad request, is a 4xx with {"error": ...}.

The frames are the sampler's own: ``Pipeline.generate``'s step callback, the one ``Pipeline.trace``
and ``ddpm viz reverse`` use, so the grid a page shows is the grid ``ddpm sample`` writes with the
same settings and seed. One :class:`Engine` per server runs one generation at a time on the
model's device, in its own thread, in the order the requests came; closing the page (the stream's
connection) cancels its generation, waiting or running, at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import itertools
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import settings
from .config import SampleConfig, SettingError
from .data import to_uint8
from .pipeline import Pipeline
from .runtime import resolve_precision
from .samplers import SAMPLERS
from .settings import SEED_MAX, settings_of
from .viz import evenly_spaced, frame_grid, gif_bytes, grid_png, reverse_frames

# At most 10 frames a second go to the page: enough to watch, and each costs the sampling thread
# two PNGs (benchmarks/serve.py: 20 a second made a 100-step generation of 64 images 70% slower)
FRAME_INTERVAL_S = 1 / 10
GIF_FRAMES = 40  # frames of the denoising GIF, as 'ddpm viz reverse' by default
GIF_SCALE = 2  # pixels per image pixel in the GIF, as 'ddpm viz reverse' by default
HEARTBEAT_S = 1.0  # a comment line while a request waits: a closed page is noticed within it
MAX_IMAGES = 128  # one batch, the one 'ddpm sample' draws (batch size 128): the same images
# The JSON fields of a generate request; the page's form has one input for each.
FIELDS = ("n", "steps", "seed", "sampler", "class", "guidance", "x0")
# A request is a few hundred bytes; a larger body is refused (413) before it is read in full.
MAX_BODY_BYTES = 2**20
SHOWN_CHARS = 40  # a value echoed in a message is cut to this: never a 301-digit number in full
# The guidance scales a request may ask for: the range SampleConfig declares ('ddpm sample's).
GUIDANCE_RULE = next(d for f, d in settings_of(SampleConfig) if f.name == "guidance")
SERVE_EXTRA = "pip install 'ddpm[serve]'"


class RequestError(ValueError):
    """A request this server will not run: the message for the page, and the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Raised from the step callback when the generation's page has gone."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how much the server holds (the flags of 'ddpm serve')."""

    max_images: int = 64
    max_steps: int | None = None  # None: the model's T (and never more than T)
    max_queue: int = 16  # requests waiting behind the running one; more are refused (503)
    # Finished grids and GIFs kept for download, newest first, at most this many bytes in all
    # (and 16 generations): the server's memory does not grow with the requests it has served.
    keep_bytes: int = 64 * 2**20
    keep_jobs: int = 16

    def check(self, num_train_timesteps: int) -> None:
        """ValueError naming the flag, for limits the model or the server cannot honour."""
        assert self.max_steps is not None  # WebServer sets None to T first
        if not 1 <= self.max_images <= MAX_IMAGES:
            raise ValueError(f"--max-images {self.max_images}: give 1..{MAX_IMAGES} (one batch, "
                             f"the one grid a page shows)")
        if not 1 <= self.max_steps <= num_train_timesteps:
            raise ValueError(f"--max-steps {self.max_steps}: give 1..{num_train_timesteps}, the "
                             f"model's training timesteps T")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue {self.max_queue}: give 0 or more")


@dataclass(frozen=True)
class GenerateRequest:
    """One checked request: what ``Pipeline.generate`` is asked for."""

    n: int
    steps: int
    seed: int
    sampler: str
    label: int | None  # None: every class in turn (a conditional model), or no class
    guidance: float
    x0: bool  # send the predicted x0 beside each x_t (and put it in the GIF)

    def settings(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "num_sample_steps": self.steps,
                "guidance": self.guidance}


# --- checking a request --------------------------------------------------------------------------


def shown(value: Any) -> str:
    """``value`` of a request as a message quotes it (``settings.shown``, spelled as JSON); a
    list or an object is only named."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    return settings.shown(value, SHOWN_CHARS, "json")


def _whole(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    """A whole number in low..high from a JSON number, or RequestError. A string is refused, as
    a boolean or a fraction is: the API takes numbers as numbers (the page sends them so)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        hint = ", a string: send the number without quotes" if isinstance(value, str) else ""
        raise RequestError(f"{name} must be a whole number, got {shown(value)}{hint}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be from {low} to {high}{why}, got {shown(value)}")
    return int(value)


def parse_body(raw: bytes) -> Any:
    """The body of ``POST /api/generate`` as strict JSON (no NaN or Infinity), or RequestError.
    An empty body is refused as null is: the defaults are asked for with ``{}``."""
    if not raw.strip():
        raise RequestError(_not_an_object("an empty body"))

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text; send a JSON object such as "
                           '{"steps": 20}') from None
    except RecursionError:  # the parser's own limit on nesting (about 1000 deep)
        raise RequestError("the request body is nested too deeply; send one flat JSON object "
                           'such as {"steps": 20}') from None
    except ValueError as exc:
        raise RequestError(f"the request body is not JSON ({exc}); send an object with some of "
                           f"the fields {', '.join(FIELDS)}") from None


def _not_an_object(what: str) -> str:
    return (f"the request must be a JSON object of some of the fields {', '.join(FIELDS)}, e.g. "
            f"{{}} for the defaults; got {what}")


def parse_request(body: Any, pipe: Pipeline, limits: Limits) -> GenerateRequest:
    """The JSON body of ``POST /api/generate`` as a request this model can run within the limits;
    RequestError with a message that names the field, the value and what to give otherwise."""
    if not isinstance(body, dict):
        raise RequestError(_not_an_object(shown(body)))
    if unknown := sorted(set(body) - set(FIELDS)):
        raise RequestError(f"unknown field {shown(unknown[0])}; the fields are "
                           f"{', '.join(FIELDS)}")
    run = pipe.config.sample
    T = pipe.schedule.num_train_timesteps
    assert limits.max_steps is not None  # WebServer sets None to T
    n = _whole("n (the number of images)", body.get("n", min(16, limits.max_images)), 1,
               limits.max_images, " (this server's --max-images)")
    steps_why = (" (the model's training timesteps T)" if limits.max_steps == T
                 else " (this server's --max-steps)")
    steps = _whole("steps", body.get("steps", min(run.num_sample_steps, limits.max_steps)), 1,
                   limits.max_steps, steps_why)
    seed = _whole("seed", body.get("seed", 0), 0, SEED_MAX)
    sampler = body.get("sampler", run.sampler)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise RequestError(f"unknown sampler {shown(sampler)}; choose one of "
                           f"{', '.join(SAMPLERS)}")
    label = _class_label(body.get("class"), pipe)
    guidance = body.get("guidance", run.guidance if pipe.num_classes else 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or \
            not GUIDANCE_RULE.admits(guidance):
        raise RequestError(f"guidance must be a number {GUIDANCE_RULE.condition()}, got "
                           f"{shown(guidance)}")
    x0 = body.get("x0", False)
    if not isinstance(x0, bool):
        raise RequestError(f"x0 must be true or false, got {shown(x0)}")
    request = GenerateRequest(n, steps, seed, sampler, label, float(guidance), x0)
    # The rules between settings and against the model (guidance only with classes, ...), by
    # the checks the CLI uses, named by this API's fields.
    try:
        pipe.sample_config(**request.settings())
    except SettingError as exc:
        names = {"sample.sampler": "sampler", "sample.num_sample_steps": "steps",
                 "sample.guidance": "guidance"}
        raise RequestError(exc.for_flag(names.get(exc.key, f"the run's {exc.key}"))) from None
    return request


def _class_label(value: Any, pipe: Pipeline) -> int | None:
    """The ``class`` field: empty for every class in turn, an index (a number), or a name."""
    if value is None or value == "":
        return None
    k = pipe.num_classes
    if not k:
        raise RequestError(f"class {shown(value)}: this model was trained without classes; "
                           f"leave class empty")
    if isinstance(value, str):
        names = [c.lower() for c in pipe.classes]
        if value.lower() in names:
            return names.index(value.lower())
        known = f" or a name ({', '.join(pipe.classes)})" if pipe.classes else ""
        raise RequestError(f"class {shown(value)} is not a class of this model; give an index "
                           f"0..{k - 1} as a number{known}, or leave it empty for every class "
                           f"in turn")
    return _whole("class", value, 0, k - 1, " (this model's classes)")


def run_name(source: str) -> str:
    """What the page calls the model: the last component of its path (the run's folder, the
    checkpoint's file), never the absolute path, which tells a visitor about this machine."""
    return Path(source).resolve().name or "the model"


def model_info(pipe: Pipeline, source: str, limits: Limits) -> dict[str, Any]:
    """What ``GET /api/model`` says: the page builds its form from it."""
    mc, run = pipe.config.model, pipe.config.sample
    k = pipe.num_classes
    assert limits.max_steps is not None  # WebServer sets None to T
    return {
        "source": run_name(source), "step": pipe.step, "image_size": mc.image_size,
        "channels": mc.in_channels, "num_train_timesteps": pipe.schedule.num_train_timesteps,
        "conditional": bool(k),
        "classes": [pipe.classes[i] if i < len(pipe.classes) else str(i) for i in range(k)],
        "samplers": list(SAMPLERS), "device": str(pipe.device),
        "precision": resolve_precision(pipe.precision, pipe.device),
        "defaults": {"n": min(16, limits.max_images), "seed": 0, "sampler": run.sampler,
                     "steps": min(run.num_sample_steps, limits.max_steps),
                     "guidance": run.guidance if k else 0.0, "x0": False},
        "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps,
                   "max_queue": limits.max_queue},
    }


# --- the queue ------------------------------------------------------------------------------------


class Job:
    """One request on its way: its events go to the stream of the page that asked for it."""

    def __init__(self, job_id: int, request: GenerateRequest, loop: asyncio.AbstractEventLoop):
        self.id, self.request = job_id, request
        self.state = "queued"  # then running, and done, cancelled or failed
        self.cancelled = threading.Event()
        self.events: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
        self._loop = loop

    def emit(self, kind: str, **data: Any) -> None:
        """Hand an event to the job's stream, from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: no one is listening
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def frame_png(images: torch.Tensor) -> bytes:
    """A frame for the page: ``viz.frame_grid`` of images ``[B, C, H, W]`` in [-1, 1] as a PNG
    compressed for speed (3-4x faster than the final grid's; lossless all the same)."""
    from PIL import Image

    grid = frame_grid(images)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(buf, format="png",
                                                                       compress_level=1)
    return buf.getvalue()


class Engine:
    """One generation at a time on the model's device; the others wait in the order they came,
    and are told how many generations are ahead of them. :meth:`run` is the loop that generates
    (``ddpm serve`` runs it on the main thread; :meth:`start` on a thread of its own)."""

    def __init__(self, pipe: Pipeline, limits: Limits):
        self.pipe, self.limits = pipe, limits
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self.results: OrderedDict[int, dict[str, bytes]] = OrderedDict()  # the newest last
        self.ended: Counter[str] = Counter()  # done, cancelled, failed

    def start(self) -> None:
        threading.Thread(target=self.run, name="ddpm-serve-sampler", daemon=True).start()

    def submit(self, request: GenerateRequest, loop: asyncio.AbstractEventLoop) -> Job:
        with self._cv:
            if self._closed:
                raise RequestError("the server is shutting down", status=503)
            if len(self._waiting) >= self.limits.max_queue + (self._running is None):
                raise RequestError(f"{len(self._waiting)} generations are waiting already (this "
                                   f"server's --max-queue); try again in a moment", status=503)
            job = Job(next(self._ids), request, loop)
            self._waiting.append(job)
            job.emit("queued", job=job.id, ahead=self._ahead(len(self._waiting) - 1))
            self._cv.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a waiting one leaves the queue now, a running one at its next step."""
        with self._cv:
            job.cancelled.set()
            if job.state == "queued" and job in self._waiting:
                self._waiting.remove(job)
                self._end(job, "cancelled")
                self._announce()

    def status(self) -> dict[str, Any]:
        with self._cv:
            return {"running": self._running.id if self._running else None,
                    "waiting": [j.id for j in self._waiting], "ended": dict(self.ended),
                    "kept": list(self.results), "kept_bytes": self._kept_bytes()}

    def close(self) -> None:
        """Cancel everything and let the worker end (the server is stopping)."""
        with self._cv:
            self._closed = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancelled.set()
                job.emit("cancelled", job=job.id, error="the server is shutting down")
            for job in self._waiting:
                self._end(job, "cancelled")
            self._waiting.clear()
            self._cv.notify_all()

    def _ahead(self, index: int) -> int:
        return index + (self._running is not None)

    def _announce(self) -> None:
        for i, job in enumerate(self._waiting):
            job.emit("queued", job=job.id, ahead=self._ahead(i))

    def _end(self, job: Job, state: str) -> None:
        job.state = state
        self.ended[state] += 1

    def run(self) -> None:
        """Generate the waiting requests in order, until :meth:`close`."""
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
                job.state = "running"
                self._announce()
            state = "failed"
            try:
                self._generate(job)
                state = "done"
            except Cancelled:
                state = "cancelled"
                job.emit("cancelled", job=job.id)
            except Exception as exc:  # e.g. out of memory: said on the page; the server goes on
                print(f"ddpm serve: generation {job.id} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
                job.emit("error", job=job.id, error=f"the generation failed: "
                                                    f"{type(exc).__name__}: {exc}")
            finally:
                with self._cv:
                    self._running = None
                    self._end(job, state)

    def _generate(self, job: Job) -> None:
        r, pipe = job.request, self.pipe
        job.emit("started", job=job.id, steps=r.steps, n=r.n)
        # The GIF's frames: GIF_FRAMES of the S + 1 states x_T .. output, evenly spread.
        keep = set(evenly_spaced(r.steps + 1, min(r.steps + 1, GIF_FRAMES)))
        states: dict[int, torch.Tensor] = {}
        x0s: dict[int, torch.Tensor] = {}
        last_sent = -math.inf

        def on_step(i: int, t: float, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
            nonlocal last_sent
            if job.cancelled.is_set():
                raise Cancelled
            if i in keep:
                states[i], x0s[i] = to_uint8(x_t.cpu()), to_uint8(x0_pred.cpu())
            now = time.perf_counter()
            if now - last_sent >= FRAME_INTERVAL_S or i == r.steps - 1:
                last_sent = now
                frame = {"job": job.id, "step": i + 1, "steps": r.steps, "t": float(t),
                         "x_t": data_url(frame_png(x_t))}
                if r.x0:
                    frame["x0"] = data_url(frame_png(x0_pred))
                job.emit("frame", **frame)

        start = time.perf_counter()
        images = pipe.generate(r.n, seed=r.seed, batch_size=r.n, labels=r.label, callback=on_step,
                               **r.settings())
        seconds = time.perf_counter() - start
        states[r.steps] = x0s[r.steps] = to_uint8(images)
        order = sorted(states)
        frames, _ = reverse_frames(torch.stack([states[i] for i in order]),
                                   torch.stack([x0s[i] for i in order]) if r.x0 else None,
                                   len(order), scale=GIF_SCALE)
        grid = grid_png(images)
        self._keep(job.id, {"grid.png": grid, "denoising.gif": gif_bytes(frames)})
        job.emit("done", job=job.id, seconds=round(seconds, 3), n=r.n, steps=r.steps,
                 grid=data_url(grid),
                 png=f"/api/jobs/{job.id}/grid.png", gif=f"/api/jobs/{job.id}/denoising.gif")

    def _keep(self, job_id: int, files: dict[str, bytes]) -> None:
        with self._cv:
            self.results[job_id] = files
            while len(self.results) > 1 and (len(self.results) > self.limits.keep_jobs or
                                             self._kept_bytes() > self.limits.keep_bytes):
                self.results.popitem(last=False)

    def _kept_bytes(self) -> int:
        return sum(len(b) for files in self.results.values() for b in files.values())


# --- HTTP -----------------------------------------------------------------------------------------


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


def _sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


class EventStream:
    """The ASGI response of a generate request: its job's events as server-sent events. When the
    client goes (the page closed, the fetch aborted), the job is cancelled."""

    FINAL = ("done", "error", "cancelled")

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            while True:
                try:
                    kind, data = await asyncio.wait_for(self.job.events.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:  # a comment line: a gone client fails the send
                    await send({"type": "http.response.body", "body": b": waiting\n\n",
                                "more_body": True})
                    continue
                await send({"type": "http.response.body", "body": _sse(kind, data),
                            "more_body": True})
                if kind in self.FINAL:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.engine.cancel(self.job)  # nothing when it has ended
            for task in tasks:
                task.cancel()
            pumped, _ = await asyncio.gather(*tasks, return_exceptions=True)
        # A client gone shows as an OSError of the send (uvicorn's ClientDisconnected) or as the
        # watch ending first; any other error is ours and is raised.
        if isinstance(pumped, Exception) and not isinstance(pumped, OSError):
            raise pumped


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
    info = model_info(engine.pipe, source, engine.limits)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def model(request: Request) -> Response:
        return JSONResponse(info)

    async def status(request: Request) -> Response:
        return JSONResponse(engine.status())

    async def generate(request: Request) -> Any:
        try:
            if request.url.query:  # settings there would be ignored: say so instead
                raise RequestError(f"POST /api/generate takes its settings as a JSON body, not "
                                   f"in the query string (got {shown('?' + request.url.query)})")
            ctype = request.headers.get("content-type", "")
            # Only a JSON POST starts work: a form or a text/plain fetch from another site (a
            # request a browser sends without asking this server first) is refused.
            if ctype.partition(";")[0].strip().lower() != "application/json":
                raise RequestError(f"send the settings as JSON with Content-Type: "
                                   f"application/json, not {shown(ctype) if ctype else 'none'}",
                                   415)
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
        path = shown(request.url.path)
        if exc.status_code == 405:
            allowed = {m.strip() for m in (exc.headers or {}).get("Allow", "GET").split(",")}
            what = (f"{request.method} {path} is not allowed; use "
                    f"{' or '.join(sorted(allowed - {'HEAD'}))}")
        else:
            what = (f"nothing at {path}; there are /, /api/model, /api/status, /api/generate "
                    f"(POST) and /api/jobs/ID/grid.png or denoising.gif")
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
                 port: int = 7860):
        try:
            import uvicorn
        except ImportError:
            raise ValueError(f"'ddpm serve' needs Starlette and uvicorn: {SERVE_EXTRA}") from None
        if limits.max_steps is None:
            limits = replace(limits, max_steps=pipe.schedule.num_train_timesteps)
        limits.check(pipe.schedule.num_train_timesteps)
        self.socket = bind(host, port)
        address, bound_port = self.socket.getsockname()[:2]
        self.engine = Engine(pipe, limits)
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

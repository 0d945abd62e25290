"""The queue of the web server: one generation at a time on the model's device, the others
waiting in the order they came; each job's frames and end go to the stream of its page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import math
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import torch

from ..cascade import upscale
from ..data import to_uint8
from ..pipeline import Pipeline
from ..viz import enlarged, evenly_spaced, frame_grid, gif_bytes, grid_png, reverse_frames
from .requests import GenerateRequest, Limits, RequestError

# At most 10 frames a second go to the page: enough to watch, and each costs the sampling thread
# two PNGs (benchmarks/serve.py: 20 a second made a 100-step generation of 64 images 70% slower)
FRAME_INTERVAL_S = 1 / 10
GIF_FRAMES = 40  # frames of the denoising GIF, as 'ddpm viz reverse' by default
GIF_SCALE = 2  # pixels per image pixel in the GIF, as 'ddpm viz reverse' by default


class Cancelled(Exception):
    """Raised from the step callback when the generation's page has gone."""


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

    def __init__(self, pipe: Pipeline, limits: Limits, stages: Sequence[Pipeline] = ()):
        """``stages``: the super-resolution stages of a cascade after ``pipe``, checked to fit
        (``cascade.Cascade``); each generation is super-resolved by them in turn."""
        self.pipe, self.limits, self.stages = pipe, limits, list(stages)
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
            state, event, fields = "failed", "error", {}
            try:
                fields = self._generate(job)
                state = event = "done"
            except Cancelled:
                state = event = "cancelled"
            except Exception as exc:  # e.g. out of memory: said on the page; the server goes on
                print(f"ddpm serve: generation {job.id} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
                fields = {"error": f"the generation failed: {type(exc).__name__}: {exc}"}
            finally:
                with self._cv:
                    self._running = None
                    self._end(job, state)
            # The job's last event goes out once the engine has let it go: a page that reads it
            # and then asks for the status finds the generation ended there too.
            job.emit(event, job=job.id, **fields)

    def _generate(self, job: Job) -> dict[str, Any]:
        """Generate ``job``'s images, sending its frames; the fields of its "done" event."""
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
        images = self._super_resolve(job, images)
        seconds = time.perf_counter() - start
        final = to_uint8(images)
        for frames_of in (states, x0s):  # a cascade's frames at its last size
            for i, frame in frames_of.items():
                frames_of[i] = enlarged(frame, final.shape[-1])
        states[r.steps] = x0s[r.steps] = final
        order = sorted(states)
        frames, _ = reverse_frames(torch.stack([states[i] for i in order]),
                                   torch.stack([x0s[i] for i in order]) if r.x0 else None,
                                   len(order), scale=GIF_SCALE)
        grid = grid_png(images)
        self._keep(job.id, {"grid.png": grid, "denoising.gif": gif_bytes(frames)})
        return {"seconds": round(seconds, 3), "n": r.n, "steps": r.steps, "grid": data_url(grid),
                "png": f"/api/jobs/{job.id}/grid.png", "gif": f"/api/jobs/{job.id}/denoising.gif"}

    def _super_resolve(self, job: Job, images: torch.Tensor) -> torch.Tensor:
        """The base model's ``images`` through the cascade's stages, if it has any."""
        r = job.request
        labels = self.pipe.class_labels(r.n, r.label) if self.stages else None
        for k, stage in enumerate(self.stages, start=1):
            if job.cancelled.is_set():
                raise Cancelled
            job.emit("stage", job=job.id, stage=k, stages=len(self.stages))
            images = upscale(stage, to_uint8(images), seed=r.seed + k, batch_size=r.n,
                             labels=labels if stage.num_classes else None)
        return images

    def _keep(self, job_id: int, files: dict[str, bytes]) -> None:
        with self._cv:
            self.results[job_id] = files
            while len(self.results) > 1 and (len(self.results) > self.limits.keep_jobs or
                                             self._kept_bytes() > self.limits.keep_bytes):
                self.results.popitem(last=False)

    def _kept_bytes(self) -> int:
        return sum(len(b) for files in self.results.values() for b in files.values())

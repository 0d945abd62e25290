"""Server-sent events: a job's frames and its end as the stream of the page that asked."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .engine import Engine, Job

HEARTBEAT_S = 1.0  # a comment line while a request waits: a closed page is noticed within it


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

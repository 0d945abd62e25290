"""What the web page costs: a generation through ``ddpm serve`` against ``Pipeline.generate``.

For one run: the seconds of ``pipe.generate`` alone, then the same request through the server
(an in-process ``WebServer`` on loopback, read by a stdlib HTTP client as the page reads it):
seconds to the first frame and to the end, the frames and bytes the stream carried, and the
server process's resident memory before and after 8 concurrent requests. Medians of --repeat.

    python benchmarks/serve.py runs/demo --n 64 --steps 100
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from ddpm.pipeline import load_pipeline
from ddpm.serve import Limits, WebServer


def rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def through_server(url: str, body: dict) -> dict:
    """One POST /api/generate read to its end: seconds to the first frame and to done."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/api/generate", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first, frames, size, kind = None, 0, 0, None
    while line := r.readline():
        size += len(line)
        text = line.decode()
        if text.startswith("event: "):
            kind = text[7:].strip()
        elif text.startswith("data: ") and kind == "frame":
            frames += 1
            first = first or time.perf_counter() - start
    conn.close()
    assert kind == "done", kind
    return {"seconds": time.perf_counter() - start, "first_frame_s": first, "frames": frames,
            "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="default: the run's")
    ap.add_argument("--sampler", default=None, help="default: the run's")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    pipe = load_pipeline(args.run, precision="auto")
    sc = pipe.config.sample
    body = {"n": args.n, "steps": args.steps or sc.num_sample_steps,
            "sampler": args.sampler or sc.sampler, "x0": True}
    settings = {"sampler": body["sampler"], "num_sample_steps": body["steps"]}
    pipe.generate(args.n, batch_size=args.n, **settings)  # warm-up
    alone = []
    for i in range(args.repeat):
        start = time.perf_counter()
        pipe.generate(args.n, seed=i, batch_size=args.n, **settings)
        alone.append(time.perf_counter() - start)

    # As 'ddpm serve' runs: the generations on this (the main) thread, uvicorn on another; the
    # client on a third, which ends the server when it is done.
    server = WebServer(pipe, args.run, Limits(), port=0)
    out: dict = {}

    def client() -> None:
        try:
            while not server.server.started:
                time.sleep(0.02)
            through_server(server.url, body)  # warm-up
            out["served"] = [through_server(server.url, {**body, "seed": i})
                             for i in range(args.repeat)]
            out["before"] = rss_mib()
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda i: through_server(server.url, {**body, "seed": 100 + i}),
                              range(8)))
            out["eight"] = time.perf_counter() - start
            out["after"] = rss_mib()
            out["kept"] = server.engine.status()["kept_bytes"] / 2**20
        finally:
            server.engine.close()  # serve_forever returns

    threading.Thread(target=client).start()
    server.serve_forever()
    served, before, after, eight, kept = (out[k] for k in ("served", "before", "after", "eight",
                                                              "kept"))

    med = lambda xs: statistics.median(xs)  # noqa: E731
    precision = pipe.precision  # auto's choice, made when it was loaded
    print(f"{args.run}: {args.n} images, {body['sampler']} {body['steps']} steps, {precision}, "
          f"x0 frames on; medians of {args.repeat}; python {sys.version.split()[0]}")
    print("| | seconds | first frame (s) | frames streamed | MB streamed |")
    print("|---|---|---|---|---|")
    print(f"| Pipeline.generate | {med(alone):.2f} | | | |")
    print(f"| POST /api/generate, to done | {med([s['seconds'] for s in served]):.2f} "
          f"| {med([s['first_frame_s'] for s in served]):.2f} "
          f"| {med([s['frames'] for s in served]):.0f} "
          f"| {med([s['bytes'] for s in served]) / 1e6:.1f} |")
    print(f"8 concurrent requests: {eight:.1f} s in all ({eight / 8:.2f} s each); resident "
          f"memory {before:.0f} -> {after:.0f} MiB ({kept:.1f} MiB of grids and GIFs kept)")


if __name__ == "__main__":
    main()

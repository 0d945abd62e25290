"""``ddpm serve``: the web page of a trained model (``ddpm.serve``), on this machine's loopback
by default."""

from __future__ import annotations

import argparse
import sys

from ..cascade import Cascade
from ..pipeline import load_pipeline
from ..runtime import resolve_precision
from .options import Defaults, UsageError, add_model_options, number, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", formatter_class=Defaults,
        help="a web page to sample a trained model and watch it denoise",
        description="Serve a page where you choose the sampler, steps, seed and number of images "
                    "(and the class and guidance of a class-conditional model), press Generate, "
                    "watch x_t and the predicted x0 step by step, and download the grid (PNG) "
                    "or the denoising (GIF). One generation runs at a time; the others wait in "
                    "order, and closing the page cancels its generation. Needs the serve extra: "
                    "pip install 'ddpm[serve]'.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory (its newest checkpoint), a .pt checkpoint or a diffusers "
                        "folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every "
                        "machine that can reach this one. Requests must be addressed to it at "
                        "--port: as localhost, 127.0.0.1 or [::1] on loopback; on 0.0.0.0 as an "
                        "IP address, localhost or this machine's host name; else as --host. "
                        "Another name is refused (421), so other sites cannot reach the server "
                        "(DNS rebinding), nor can their pages start generations (Origin)")
    p.add_argument("--port", type=number(int, at_least=0, at_most=65535), default=7860,
                   help="port to listen on (0: any free one)")
    p.add_argument("--max-images", type=positive_int, default=64,
                   help="the most images one request may ask for (at most 128)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="the most sampling steps one request may ask for (default: the model's T)")
    p.add_argument("--max-queue", type=number(int, at_least=0), default=16,
                   help="requests that may wait behind the running one; more are refused")
    p.add_argument("--then", metavar="SR_RUN", action="append", default=[],
                   help="serve a cascade: super-resolve every generation with this "
                        "super-resolution run (repeat for a longer chain)")
    add_model_options(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ..serve import Limits, WebServer

    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema,
                         precision=args.precision, compile=args.compile)
    if pipe.low_res is not None:
        raise UsageError(f"{args.checkpoint} is a super-resolution run, a later stage of a "
                         f"cascade: serve its base run with '--then {args.checkpoint}', or "
                         f"upscale images with 'ddpm upscale {args.checkpoint}'")
    stages = Cascade(pipe, [load_pipeline(path, device=args.device, use_ema=not args.no_ema,
                                          precision=args.precision) for path in args.then]).stages
    limits = Limits(max_images=args.max_images, max_steps=args.max_steps,
                    max_queue=args.max_queue)
    try:
        server = WebServer(pipe, str(args.checkpoint), limits, host=args.host, port=args.port,
                           stages=stages)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ddpm serve: warning: --host {args.host} lets every machine that can reach this "
              f"one use the page and this machine's {pipe.device.type.upper()}; the page has no "
              f"password", file=sys.stderr)
    k = pipe.num_classes
    precision = resolve_precision(pipe.precision, pipe.device)
    chain = f", then {len(stages)} super-resolution stage(s)" if stages else ""
    print(f"serving {args.checkpoint}{chain} (step {pipe.step}, "
          f"{f'{k} classes' if k else 'unconditional'}, {pipe.device} {precision}) at "
          f"{server.url}", flush=True)
    print("open that address in a browser; Ctrl+C stops the server", flush=True)
    server.serve_forever()  # until Ctrl+C
    print("ddpm serve: stopped", file=sys.stderr)
    return 0

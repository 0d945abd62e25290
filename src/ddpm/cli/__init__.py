"""The ``ddpm`` command line: the only place that parses strings.

``main`` builds the parser from one module per command family (``train``;
``train-autoencoder``; ``sample`` and
``eval``; ``viz``; the ``tools`` bench, presets, train-classifier, posthoc-ema and export;
``serve``), runs the command, and turns user mistakes into one line and exit code 2 instead of
a traceback. The options of every setting
are made from its declaration in the config (``options.add_settings``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from .. import __version__
from ..checkpoint import CheckpointError, SaveError
from ..classifier import WeightsNotFoundError
from ..data import DatasetNotFoundError
from ..parallel import WorkerError
from ..settings import SettingError
from . import autoencoder, sample, serve, tools, train, viz
from .options import EXIT_USAGE, Parser, UsageError, setting_flags

EXIT_BROKEN_PIPE = 141  # a shell's exit code for a program ended by SIGPIPE


def build_parser() -> Parser:
    parser = Parser(
        prog="ddpm",
        description="Train denoising diffusion (DDPM) image generators from scratch and sample "
                    "them. Run 'ddpm COMMAND --help' for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    train.add_parser(sub)
    autoencoder.add_parser(sub)
    sample.add_sample_parser(sub)
    sample.add_upscale_parser(sub)
    sample.add_eval_parser(sub)
    tools.add_train_classifier_parser(sub)
    tools.add_bench_parser(sub)
    tools.add_presets_parser(sub)
    tools.add_posthoc_parser(sub)
    tools.add_export_parser(sub)
    serve.add_parser(sub)
    viz.add_parser(sub)
    return parser


def _one_line_warning(command: str, message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings (skipped files, a damaged newest checkpoint) as one line, like the errors."""
    print(f"ddpm {command}: warning: {message}", file=file or sys.stderr)


def _setting_message(exc: SettingError, argv: Sequence[str]) -> str:
    """A rule broken by one setting, named by the flag the user typed (or its config key)."""
    flag = setting_flags().get(exc.key)
    if flag is not None and any(a == flag or a.startswith(flag + "=") for a in argv):  # typed
        return exc.for_flag(flag)
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # as typed: 'ddpm train --num-processes N' hands them on to its processes
    if args.command == "viz":
        args.command = f"viz {args.figure}"  # messages name the figure: 'ddpm viz reverse: error'
    command = args.command
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_one_line_warning, command)
            code = args.func(args)
            sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
            return code
    except BrokenPipeError:
        # The reader of stdout has gone ('ddpm presets | head'): stop quietly, as a program
        # killed by SIGPIPE does, with the shell's code for that (128 + 13). Python would flush
        # stdout again at exit and complain, so stdout goes to /dev/null first.
        with contextlib.suppress(OSError, ValueError):  # a stdout without a file (tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except SettingError as exc:
        print(f"ddpm {command}: error: {_setting_message(exc, argv)}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ValueError, CheckpointError, DatasetNotFoundError, WeightsNotFoundError) as exc:
        print(f"ddpm {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SaveError, WorkerError) as exc:  # a full disk, a sampling worker killed for memory:
        print(f"ddpm {command}: error: {exc}", file=sys.stderr)  # the machine's, not a usage error
        return 1
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"ddpm {command}: error: cannot write {exc.filename}: {exc.strerror}; "
              f"choose a writable path", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:  # training diverged: not a usage error, but no traceback
        print(f"ddpm {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddpm {command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            raise
        # Another training process failed and this one lost it mid-collective: the cause is in
        # that process's message, so one line here, not a second traceback.
        print(f"ddpm {command} (process {os.environ['RANK']}): stopped: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]

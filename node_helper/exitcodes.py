"""The exit-code convention of every netaccel command line (`netaccel`, `netaccel-lab`).

    0  success
    1  the operation failed (one line on stderr says why)
    2  bad usage or bad input (a CIDR, a namespace that is not KubeVirt-shaped, ...)
    3  a required kernel or host feature is missing (the message says what to install or do)

`run()` maps the exceptions of the package to these codes, so each CLI only lists the
exceptions that are its own "failed" or "bad input".
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from node_helper.kernel import KernelFeatureError

OK, FAILED, BAD_INPUT, MISSING_FEATURE = 0, 1, 2, 3
INTERRUPTED = 130  # the shell's convention for SIGINT


def run(prog: str, handler: Callable[[argparse.Namespace], int], args: argparse.Namespace,
        failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run a CLI handler; turn exceptions into one stderr line and an exit code.

    ValueError (and subclasses such as the datapaths' shape errors) is bad input;
    KernelFeatureError a missing feature; `failures` and anything else a failed operation.
    """
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `netaccel ... | head` ends quietly
    try:
        return handler(args)
    except KernelFeatureError as exc:
        print(f"{prog}: missing requirement: {exc}", file=sys.stderr)
        return MISSING_FEATURE
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return BAD_INPUT
    except (*failures, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback, for operators
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return FAILED

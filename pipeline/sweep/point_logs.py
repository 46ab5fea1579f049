"""Each grid point's output in its own file, `{storage}/logs/{run name}.log`, instead of the sweep's terminal.

A trial's process (and each Ray Train worker of a multi-worker point) sends its file descriptors 1 and 2 there
while it trains, so everything it prints lands in the file: the trainer's step lines, DeepSpeed's and Ray's
messages, and the traceback when the point fails. The driver prints the path when a point fails.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def point_log(storage: str | Path, run_name: str) -> Path:
    return Path(storage) / "logs" / f"{run_name}.log"


@contextmanager
def output_to(path: str | Path) -> Iterator[None]:
    """Send this process's stdout and stderr to `path` (appended: a resumed or retried point keeps its history)
    until the block ends; an exception leaving the block is written there first, then raised on."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)

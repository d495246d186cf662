"""The ``replicator`` command (console script and ``python -m replicator``)."""

import atexit
import gc
import os
import signal
import sys

GC_YOUNG_THRESHOLD = 50_000
"""Container allocations between collections of the youngest generation (CPython's default:
700). A sync allocates many long-lived small objects (file records, chunk lists, the S3 SDK's
service model), and with the default thresholds the collector kept re-scanning them: 0.2 s of
a 20,000-small-file sync (552 collections) and 0.09 s of a 1 GiB S3 increment went to garbage
collection, measured with ``gc.callbacks``. Nothing we keep relies on the collector to free
memory promptly; the cycles it finds are rare and small."""


def _interrupted_early(_signum: int, _frame: object) -> None:
    """Ctrl-C while the command is still starting (importing, parsing, loading the config):
    nothing has been written yet, so stop at once with the one documented line. A
    KeyboardInterrupt raised in the middle of an import surfaced as an unrelated traceback
    ("Error calling __set_name__"), or none at all. :func:`replicator.cli.support.run_coroutine`
    puts Python's handler back before the command starts its work, which then stops in order."""
    line = (
        '{"error": "interrupted", "exit_code": 130}'
        if "--json" in sys.argv
        else "replicator: error: interrupted"
    )
    os.write(2, (line + "\n").encode())
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_early)
    # We never call BLAS, but numpy loads OpenBLAS, whose idle worker threads spin on every
    # core and took ~4 % of the CPU time of a sync (perf, bench_sync data). Set before numpy
    # is imported; an explicit setting from the environment wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    try:
        from replicator.cli import main as cli_main

        # What is alive now lives for the whole process: never scan it again. At exit, freeze
        # everything, so that interpreter shutdown does not run full collections over objects
        # that are about to be freed anyway (~0.1 s after a 1 GiB S3 sync, `perf record`).
        gc.freeze()
        atexit.register(gc.freeze)
        cli_main()
    except KeyboardInterrupt:
        # Ctrl-C before a command runs its work (while importing, loading the config): the
        # commands themselves turn it into this same line (issue 22: no traceback, exit 130).
        json_error = '{"error": "interrupted", "exit_code": 130}'
        sys.stderr.write((json_error if "--json" in sys.argv else "replicator: error: interrupted") + "\n")
        sys.exit(130)


if __name__ == "__main__":
    main()

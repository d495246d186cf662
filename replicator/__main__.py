"""The ``replicator`` command (console script and ``python -m replicator``)."""

import os


def main() -> None:
    # We never call BLAS, but numpy loads OpenBLAS, whose idle worker threads spin on every
    # core and took ~4 % of the CPU time of a sync (perf, bench_sync data). Set before numpy
    # is imported; an explicit setting from the environment wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from replicator.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()

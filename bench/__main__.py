"""`python -m bench [--quick]`: the benchmark of bench/run.py (what `make bench` runs).

Started as a package's __main__, the client processes it forks from the forkserver do not run the
benchmark module again as their own main module (multiprocessing skips `*.__main__`)."""
import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())

"""Run the danlu benchmark suite: ``python benchmarks/run.py [options]`` (the same as ``danlu bench``).

See ``python benchmarks/run.py --help`` and docs/performance.md.
"""

import sys

from danlu.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

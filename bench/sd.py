"""Same as `latentforge bench sd`; run: python bench/sd.py --json [--preset tiny] [--cache DIR]."""

import sys

from latentforge.benchmarks.sd import main

sys.exit(main(sys.argv[1:]))

"""Same as `latentforge bench generate`; run: python bench/generate.py --json [--skip-bf16]."""

import sys

from latentforge.benchmarks.generate import main

sys.exit(main(sys.argv[1:]))

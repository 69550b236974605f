"""Same as `latentforge bench samplers`; run: python bench/samplers.py [--json] [--no-diffusers]."""

import sys

from latentforge.benchmarks.samplers import main

sys.exit(main(sys.argv[1:]))

"""Same as `latentforge bench unet`; run: python bench/unet.py --json [--quick] [--skip-bf16]."""

import sys

from latentforge.benchmarks.unet import main

sys.exit(main(sys.argv[1:]))

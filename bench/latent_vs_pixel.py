"""Same as `latentforge bench latent-vs-pixel`; run: python bench/latent_vs_pixel.py --json."""

import sys

from latentforge.benchmarks.latent_pixel import main

sys.exit(main(sys.argv[1:]))

"""latentforge: diffusion models from scratch, in pixel and latent space.

`pipe = latentforge.load("default")` and `pipe("a red circle", num=4, seed=0)` give PIL images
(`api.py`). Importing the package plugs in the datasets it ships (the shapes wing registers its
data spec and layout planner, the photos wing its data spec), as a user's own dataset would.
"""

__version__ = "0.1.0"

from . import photos as _photos  # noqa: F401  (registers the photos data spec)
from . import shapes as _shapes  # noqa: F401  (registers the shapes data spec and layout)
from .api import Pipeline, load

__all__ = ["Pipeline", "__version__", "load"]

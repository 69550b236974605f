"""latentforge: diffusion models from scratch, in pixel and latent space."""

__version__ = "0.1.0"

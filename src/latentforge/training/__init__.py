"""Training: the generic loop (`loop`) and the trainers built on it (`diffusion`, `tasks`,
`vae_train`), over the datasets of `latentforge.data`.

The public API: `TrainConfig` and `train_diffusion` (diffusion U-Nets, every `--task`),
`VAETrainConfig` and `train_vae` (the autoencoder).
"""

from .diffusion import TrainConfig
from .tasks import train_diffusion
from .vae_train import VAETrainConfig, train_vae

__all__ = ["TrainConfig", "VAETrainConfig", "train_diffusion", "train_vae"]

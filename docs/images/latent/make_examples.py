"""Regenerate the images of docs/latent.md from the models that the commands on that page train
(runs/vae-f4, runs/pixel, runs/latent).

Run from the repository root: python docs/images/latent/make_examples.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from latentforge.cli import main
from latentforge.io.images import load_image, save_png
from latentforge.io.model_folder import load_vae
from latentforge.metrics.superres_eval import held_out_images
from latentforge.models.vae import latent_to_rgb_preview

D = Path("docs/images/latent")
W = Path(tempfile.mkdtemp())


def run(*argv) -> None:
    argv = [str(a) for a in argv]
    print("latentforge", " ".join(argv))
    assert main(argv) == 0


def rows(*batches: torch.Tensor, scale: int = 2, gap: int = 2) -> torch.Tensor:
    """Batches of (N, 3, H, W) images in [-1, 1] as rows of one image, scaled up (nearest)."""
    out = []
    for b in batches:
        b = F.interpolate(b, scale_factor=scale, mode="nearest")
        b = F.pad(b, (gap, gap, gap, gap), value=1.0)  # white frame
        out.append(torch.cat(list(b), dim=-1))
    return torch.cat(out, dim=-2)


# 1. reconstructions: held-out shapes:64 images (stream 1, including the colour/shape pairs held
#    out of training), the VAE's reconstruction, and the cheap linear latent -> RGB preview
vae, meta = load_vae("runs/vae-f4")
x = held_out_images("shapes:64", 8, 1)
with torch.no_grad():
    z = vae.encode(x).mode()
    recon = vae.decode(z).clamp(-1, 1)
    cheap = F.interpolate(latent_to_rgb_preview(z, vae.latent_rgb), size=64, mode="nearest")
save_png(rows(x, recon, cheap), D / "reconstructions.png")

# 2. a generation, step by step: noisy state (top) and decoded x0 estimate (bottom)
run("generate", "", "--model", "runs/latent", "--num", 4, "--steps", 20, "--seed", 3,
    "--preview", D / "steps.gif", "--out", W / "latent.png")  # fmt: skip

# 3. samples of the two models of the benchmark, same seeds, DDIM 20 steps
for name in ("pixel", "latent"):
    run("generate", "", "--model", f"runs/{name}", "--num", 8, "--steps", 20,
        "--sampler", "ddim", "--out", W / f"{name}-grid.png")  # fmt: skip
grids = [load_image(W / f"{n}-grid.png", 3) for n in ("pixel", "latent")]
save_png(torch.cat(grids, dim=-2), D / "pixel-vs-latent.png")

"""Regenerate docs/images/superres/shapes-x4.png with the embedded upscaler.

Rows: six held-out shapes:64 images (stream 1) downsampled to 16x16 and shown nearest, bicubic
x4, the upscaler (DDIM, 20 steps, noise level 0), the original. Each 64 px image is drawn at 2x.

Run from the repository root: python docs/images/superres/make_example.py
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.io.model_folder import load_diffusion_model
from latentforge.metrics.superres_eval import bicubic, held_out_images
from latentforge.models.conditioned import downsample
from latentforge.pipelines.superres import default_upscaler_dir, upscale

OUT = Path("docs/images/superres/shapes-x4.png")


def main() -> None:
    model = load_diffusion_model(default_upscaler_dir())
    images = held_out_images("shapes:64", 6, data_seed=1)
    low = downsample(images, 4)
    rows = [
        F.interpolate(low, scale_factor=4, mode="nearest"),
        bicubic(low, 4),
        upscale(model, low, steps=20, noise_level=0.0),
        images,
    ]
    padded = [F.pad(row, (2, 2, 2, 2), value=1.0) for row in rows]  # white 4 px gutters
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in padded], dim=-2)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(pixels)
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Small stars through the VAE round trip, before and after the edge-weighted decoder
fine-tune (docs/latent.md): held-out small-star scenes (top), the first decoder (middle), the
embedded model's decoder (bottom), each cropped around the star and enlarged.

Run from the repository root: python docs/images/latent/make_small_stars.py OLD_VAE [NEW_VAE]
(NEW_VAE defaults to the embedded model's VAE).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.io.model_folder import default_model_dir, load_vae
from latentforge.shapes.scenes import render_shapes, shapes_record

CROP, N, ZOOM = 24, 8, 4


def small_star_scenes(n: int) -> list[dict]:
    out, i = [], 0
    while len(out) < n:  # held-out stream: seed 1, as eval vae
        r = shapes_record(i, seed=1, resolution=64)
        i += 1
        o = r["objects"]
        if len(o) == 1 and o[0]["shape"] == "star" and o[0]["size"] == "small":
            out.append(r)
    return out


def crop(img: torch.Tensor, o: dict) -> np.ndarray:
    cx, cy, h = int(o["cx"]), int(o["cy"]), CROP // 2
    p = torch.nn.functional.pad(img, (h, h, h, h), value=-1)[:, cy : cy + CROP, cx : cx + CROP]
    return ((p.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def main() -> None:
    old = sys.argv[1]
    new = sys.argv[2] if len(sys.argv) > 2 else str(default_model_dir() / "vae")
    scenes = small_star_scenes(N)
    x = (
        torch.stack(
            [torch.from_numpy(np.array(render_shapes(r))).permute(2, 0, 1) for r in scenes]
        ).float()
        / 127.5
        - 1
    )
    rows = [x]
    for folder in (old, new):
        vae, _ = load_vae(folder)
        with torch.no_grad():
            rows.append(vae.decode(vae.encode(x).mode()))
    grid = np.concatenate(
        [np.concatenate([crop(r[k], s["objects"][0]) for k, s in enumerate(scenes)], 1)
         for r in rows], 0
    )  # fmt: skip
    out = Path(__file__).parent / "small-stars.png"
    Image.fromarray(grid).resize((grid.shape[1] * ZOOM, grid.shape[0] * ZOOM), Image.NEAREST).save(
        out
    )
    print(out)


if __name__ == "__main__":
    main()

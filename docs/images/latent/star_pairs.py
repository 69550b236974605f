"""Which small stars survive a VAE's round trip, by star colour and background colour
(docs/latent.md): for every pair, N small stars (one per grid cell, jittered) are rendered,
encoded, decoded from the posterior mode and read back by the shapes analyser. Prints a
Markdown table of how many come back as stars.

Run from the repository root: python docs/images/latent/star_pairs.py [VAE ...]
(default: the embedded model's VAE).
"""

import random
import sys

import numpy as np
import torch

from latentforge.io.model_folder import default_model_dir, load_vae
from latentforge.shapes.evaluate import analyse
from latentforge.shapes.scenes import BACKGROUND_COLOURS, COLOURS, SIZES, render_shapes

N, RES = 8, 64


def star_scenes(colour: str, background: str, n: int) -> list[dict]:
    rng = random.Random(f"{colour}/{background}")
    scenes = []
    for k in range(n):
        row, col = divmod(k % 9, 3)
        radius = SIZES["small"] / 2 * rng.uniform(0.92, 1.08) * RES
        cx = ((2 * col + 1) / 6 + rng.uniform(-0.03, 0.03)) * RES
        cy = ((2 * row + 1) / 6 + rng.uniform(-0.03, 0.03)) * RES
        star = {"shape": "star", "colour": colour, "size": "small", "cx": cx, "cy": cy,
                "radius": radius}  # fmt: skip
        scenes.append({"objects": [star], "background": background, "resolution": RES})
    return scenes


def stars_kept(vae: torch.nn.Module, colour: str, background: str) -> int:
    scenes = star_scenes(colour, background, N)
    x = torch.stack([torch.from_numpy(np.array(render_shapes(s))) for s in scenes])
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    return sum(any(o["shape"] == "star" for o in analyse(r)["objects"]) for r in recon)


def main() -> None:
    folders = sys.argv[1:] or [str(default_model_dir() / "vae")]
    for folder in folders:
        vae, _ = load_vae(folder)
        vae.eval()
        print(f"\n{folder}: small stars read back as stars, of {N} (rows: star, columns: "
              "background)\n")  # fmt: skip
        print("| star |", " | ".join(BACKGROUND_COLOURS), "|")
        print("|---" * (len(BACKGROUND_COLOURS) + 1) + "|")
        kept = total = 0
        for colour in COLOURS:
            cells = []
            for background in BACKGROUND_COLOURS:
                if background == colour:
                    cells.append("-")
                    continue
                k = stars_kept(vae, colour, background)
                kept, total = kept + k, total + N
                cells.append(str(k) if k == N else f"**{k}**")
            print(f"| {colour} |", " | ".join(cells), "|")
        print(f"\nall pairs: {kept} / {total} ({kept / total:.1%})")


if __name__ == "__main__":
    main()

"""The prompt grid of README.md and docs/text-to-image.md: one row per prompt (the prompt and
what the shapes analyser reads are printed under each row), seeds 0-5, the model's defaults.

Run from the repository root: python docs/images/t2i/make_grid.py [MODEL_DIR]
(default: the embedded model).
"""

import sys
from pathlib import Path

import torch.nn.functional as F
from PIL import Image, ImageDraw

from latentforge.io.images import to_pil
from latentforge.io.model_folder import load_diffusion_model
from latentforge.pipelines.generate import generate
from latentforge.shapes.evaluate import analyse, matches
from latentforge.shapes.scenes import parse_prompt

PROMPTS = [
    "a large yellow star in the center on a blue background",
    "a small white circle in the top left on a black background",
    "a large purple square in the bottom right on an orange background",
    "a small red circle in the top above a large blue square in the bottom on a white background",
    # held-out colour/shape pairs (never in training): red star, blue triangle
    "a large red star in the center on a gray background",
    "a small blue triangle in the left left of a large green square in the right "
    "on a yellow background",
]
SEEDS = 6
SCALE, GAP, TEXT = 2, 4, 26

model = load_diffusion_model(sys.argv[1] if len(sys.argv) > 1 else None)
rows = [generate(model, prompts=[p], num=SEEDS, seed=0) for p in PROMPTS]
side = rows[0].shape[-1] * SCALE
width = SEEDS * (side + GAP) + GAP
canvas = Image.new("RGB", (width, len(PROMPTS) * (side + GAP + TEXT) + GAP), "white")
draw = ImageDraw.Draw(canvas)
right = 0
for row, (prompt, images) in enumerate(zip(PROMPTS, rows, strict=True)):
    want = parse_prompt(prompt)
    ok = [all(matches(want, analyse(im)).values()) for im in images]
    right += sum(ok)
    big = F.interpolate(images, scale_factor=SCALE, mode="nearest")
    y = GAP + row * (side + GAP + TEXT)
    for i, im in enumerate(big):
        x = GAP + i * (side + GAP)
        canvas.paste(to_pil(im), (x, y))
        # a green (right) or red (wrong) bar under each image: the analyser's verdict
        draw.rectangle([x, y + side + 1, x + side - 1, y + side + 3], fill=(40, 170, 60) if ok[i]
                       else (220, 40, 40))  # fmt: skip
    draw.text((GAP, y + side + 6), f"{prompt}  ({sum(ok)}/{SEEDS})", fill="black")
out = Path("docs/images/t2i/grid.png")
out.parent.mkdir(parents=True, exist_ok=True)
canvas.save(out)
print(f"{out}: {right} of {len(PROMPTS) * SEEDS} images right")

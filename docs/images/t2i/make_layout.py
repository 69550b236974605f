"""Regional prompting, before and after (docs/text-to-image.md): for each two-object prompt a
row with --layout none and a row with --layout shapes, the same seeds 0-5, the model's other
defaults; the bar under each image is the shapes analyser's verdict, and the first image of a
layout row has its region boxes drawn around it.

Run from the repository root: python docs/images/t2i/make_layout.py [MODEL_DIR]
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
from latentforge.shapes.layout import shapes_layout
from latentforge.shapes.scenes import parse_prompt

PROMPTS = [
    "a small red circle in the top above a large blue square in the bottom on a white background",
    "a large orange star in the left and a small black circle in the top right "
    "on a purple background",
    # held-out colour/shape pairs (never in training): blue triangle, red star
    "a small blue triangle left of a large yellow circle on a gray background",
    "a large red star in the bottom left and a small white square in the top right "
    "on a green background",
]
SEEDS = 6
SCALE, GAP, TEXT, LABEL = 2, 4, 16, 60

model = load_diffusion_model(sys.argv[1] if len(sys.argv) > 1 else None)
side = model.output_shape[-1] * SCALE
width = LABEL + SEEDS * (side + GAP) + GAP
height = len(PROMPTS) * (2 * (side + GAP + 4) + TEXT + GAP) + GAP
canvas = Image.new("RGB", (width, height), "white")
draw = ImageDraw.Draw(canvas)
y = GAP
score = {"none": 0, "shapes": 0}
for prompt in PROMPTS:
    want = parse_prompt(prompt)
    draw.text((GAP, y), prompt, fill="black")
    y += TEXT
    for layout in ("none", "shapes"):
        images = generate(model, prompts=[prompt], num=SEEDS, seed=0, layout=layout)
        ok = [all(matches(want, analyse(im)).values()) for im in images]
        score[layout] += sum(ok)
        big = F.interpolate(images, scale_factor=SCALE, mode="nearest")
        draw.text((GAP, y + side // 2 - 6), f"{'plain' if layout == 'none' else 'layout'}"
                  f" {sum(ok)}/{SEEDS}", fill="black")  # fmt: skip
        for i, im in enumerate(big):
            x = LABEL + i * (side + GAP)
            canvas.paste(to_pil(im), (x, y))
            draw.rectangle([x, y + side + 1, x + side - 1, y + side + 3],
                           fill=(40, 170, 60) if ok[i] else (220, 40, 40))  # fmt: skip
        if layout == "shapes":
            for region in shapes_layout(prompt):
                x0, y0, x1, y1 = (round(v * side) for v in region.box)
                draw.rectangle([LABEL + x0, y + y0, LABEL + x1 - 1, y + y1 - 1], outline="white")
        y += side + GAP + 4
    y += GAP
out = Path("docs/images/t2i/layout.png")
canvas.save(out)
print(f"{out}: right of {len(PROMPTS) * SEEDS} images: {score}")

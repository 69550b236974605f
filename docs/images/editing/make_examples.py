"""Regenerate the images of docs/editing.md with the CLI and the digits model at runs/digits
(`latentforge train diffusion --data digits --cond class --max-steps 3000 --out runs/digits`).

Run from the repository root: python docs/images/editing/make_examples.py
"""

import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from latentforge.cli import main
from latentforge.io.images import load_image, save_png

D = Path("docs/images/editing")
W = Path(tempfile.mkdtemp())
M = ["--model", "runs/digits"]


def run(*argv) -> None:
    argv = [str(a) for a in argv]
    print("latentforge", " ".join(argv))
    assert main(argv) == 0


def strip(paths: list[Path], out: Path, scale: int = 8, gap: int = 4) -> None:
    """Images side by side, scaled up (nearest) so 16x16 digits are visible."""
    ims = [Image.open(p).convert("L") for p in paths]
    ims = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in ims]
    canvas = Image.new("L", (sum(im.width + gap for im in ims) - gap, ims[0].height), 255)
    for i, im in enumerate(ims):
        canvas.paste(im, (i * (im.width + gap), 0))
    canvas.save(out)


def first_image(grid: Path, out: Path) -> None:
    save_png(load_image(grid, 1)[:, 2:18, 2:18], out)  # generate's grid pads 2 px


# 1. sketch -> image: a few overlapping blobs, roughly a seven
sketch = Image.new("L", (64, 64), 0)
draw = ImageDraw.Draw(sketch)
for box, v in [((8, 8, 30, 22), 210), ((24, 6, 56, 20), 240), ((38, 16, 54, 34), 190),
               ((30, 28, 46, 44), 220), ((20, 40, 36, 60), 180)]:  # fmt: skip
    draw.ellipse(box, fill=v)
sketch.save(D / "sketch.png")
sketch.resize((16, 16), Image.BICUBIC).save(W / "sketch16.png")  # what the model sees
outs = [W / "sketch16.png"]
for s in (0.3, 0.5, 0.7, 1.0):
    outs.append(W / f"seven-{s}.png")
    run("img2img", D / "sketch.png", "a seven", "--strength", s, *M, "--out", outs[-1])
strip(outs, D / "sketch-to-image.png")

# 2. inpainting: regenerate the top half of a generated three as a nine
run("generate", "a three", *M, "--seed", 1, "--out", W / "three-grid.png")
first_image(W / "three-grid.png", D / "three.png")
mask = -torch.ones(1, 16, 16)
mask[:, :8] = 1
save_png(mask, D / "mask-top.png")
outs = [D / "three.png", D / "mask-top.png"]
for name, extra in [("plain", []), ("repaint", ["--resample", 5]),
                    ("feather", ["--resample", 5, "--feather", 2])]:  # fmt: skip
    outs.append(W / f"inpaint-{name}.png")
    run("inpaint", D / "three.png", D / "mask-top.png", "a nine", "--seed", 2, *extra, *M,
        "--out", outs[-1])  # fmt: skip
strip(outs, D / "inpaint.png")

# 3. interpolation between two generated digits (GIF and strip), and a seed walk 4 -> 9
run("generate", "a zero", *M, "--seed", 0, "--out", W / "zero-grid.png")
first_image(W / "zero-grid.png", D / "zero.png")
pair = [D / "zero.png", D / "three.png", "--label-a", 0, "--label-b", 3, "--frames", 8, *M]
run("interpolate", *pair, "--out", D / "interpolate.gif")
run("interpolate", *pair, "--out", W / "interp-strip.png")
run("interpolate", "--seeds", 0, 7, "--prompt-a", "a four", "--prompt-b", "a nine",
    "--frames", 8, *M, "--out", W / "walk-strip.png")  # fmt: skip
for name in ("interp", "walk"):
    im = Image.open(W / f"{name}-strip.png")
    im.resize((im.width * 6, im.height * 6), Image.NEAREST).save(D / f"{name}.png")

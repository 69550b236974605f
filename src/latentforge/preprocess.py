"""Control-image preprocessors: an input picture -> the control image a ControlNet reads.

Pure image code (numpy, scipy.ndimage, Pillow), no downloaded weights; every preprocessor
takes a PIL image of any size and returns an RGB image of the same size.

- ``none``: the image as it is (RGB).
- ``canny``: Canny (1986) edges, white on black, as OpenCV's ``cv2.Canny(image, low, high)``
  computes them with A1111's defaults 100 / 200: 3x3 Sobel gradients (per pixel, the channel
  of largest magnitude), L1 magnitude, non-maximum suppression in four directions, hysteresis.
- ``scribble`` / ``sketch``: a drawing -> white strokes of one width on black, the convention
  of ControlNet's scribble models. Ink is what differs from the background (dark lines on a
  light page, or light on dark); it is thresholded (by default halfway between the page and the
  darkest ink), thinned to a one-pixel skeleton (Zhang and
  Suen 1984) and redrawn ``stroke`` pixels wide (default: the image side / 32, so a sketch of
  any size looks the same once resized to the model's input).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from .errors import UserError

MAX_PIXELS = 64 * 2**20  # a larger control image is refused (hostile sizes)
STROKE_FRACTION = 1 / 32  # scribble's default stroke width, a fraction of the shorter side
MIN_CONTRAST = 32  # scribble: a page with less luminance range holds no ink
GREY = frozenset({"canny", "scribble", "sketch"})  # kinds whose output has equal channels


def _rgb(image: Image.Image) -> np.ndarray:
    """The image as (H, W, 3) uint8, or a one-line UserError for anything that is not one."""
    if not isinstance(image, Image.Image):
        raise UserError(f"a control image must be a picture, not {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1 or w * h > MAX_PIXELS:
        raise UserError(f"control image {w}x{h}: its sides must be >= 1 and its area at most "
                        f"{MAX_PIXELS:,} pixels")  # fmt: skip
    try:
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")  # transparent -> white paper
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:  # truncated or corrupt files fail when decoded
        raise UserError(f"control image: not readable ({type(e).__name__}: {e})") from None


def _white_on_black(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2), "RGB")


def none(image: Image.Image) -> Image.Image:
    """The image as it is, in RGB."""
    return Image.fromarray(_rgb(image), "RGB")


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges (white on black) with hysteresis thresholds `low` < `high` on the L1
    gradient magnitude of 8-bit values, as OpenCV's Canny without blurring."""
    if not 0 <= low <= high:
        raise UserError(f"canny thresholds need 0 <= low <= high, got {low} and {high}")
    x = _rgb(image).astype(np.float32)
    gx = np.stack([ndimage.sobel(x[..., c], axis=1, mode="nearest") for c in range(3)])
    gy = np.stack([ndimage.sobel(x[..., c], axis=0, mode="nearest") for c in range(3)])
    mag = np.abs(gx) + np.abs(gy)  # (3, H, W)
    pick = mag.argmax(axis=0)[None]
    gx, gy, mag = (np.take_along_axis(a, pick, axis=0)[0] for a in (gx, gy, mag))
    # non-maximum suppression: keep a pixel that beats both neighbours across the edge
    # (directions quantised to 0, 45, 90, 135 degrees; ties go to the first, as OpenCV does)
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180
    sector = ((angle + 22.5) // 45).astype(int) % 4
    pad = np.pad(mag, 1)
    h, w = mag.shape
    keep = np.zeros_like(mag, dtype=bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = pad[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (sector == k) & (mag > behind) & (mag >= ahead)
    weak = keep & (mag > low)
    labels, _ = ndimage.label(weak, structure=np.ones((3, 3)))
    strong = np.unique(labels[keep & (mag > high)])
    return _white_on_black(np.isin(labels, strong[strong > 0]))


def thin(mask: np.ndarray) -> np.ndarray:
    """The one-pixel skeleton of a boolean mask by Zhang and Suen's (1984) two-pass thinning
    (`skimage.morphology.skeletonize`'s method for 2-D images, which is not a base dependency;
    the two differ in a few pixels of short spurs)."""
    img = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for first in (True, False):
            c = img[1:-1, 1:-1]
            # neighbours P2..P9, clockwise from north
            p = [img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:], img[2:, 2:],
                 img[2:, 1:-1], img[2:, :-2], img[1:-1, :-2], img[:-2, :-2]]  # fmt: skip
            count = sum(q.astype(np.uint8) for q in p)
            transitions = sum(
                (~a & b).astype(np.uint8) for a, b in zip(p, p[1:] + p[:1], strict=True)
            )
            n, e, s, w = p[0], p[2], p[4], p[6]
            if first:
                side = ~(n & e & s) & ~(e & s & w)
            else:
                side = ~(n & e & w) & ~(n & s & w)
            delete = c & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if delete.any():
                img[1:-1, 1:-1] = c & ~delete
                changed = True
        if not changed:
            return img[1:-1, 1:-1]


def scribble(
    image: Image.Image, threshold: float | None = None, stroke: int | None = None
) -> Image.Image:
    """A drawing -> white strokes `stroke` pixels wide on black (default: the shorter side /
    32). The page is the median luminance; ink is the other side of `threshold` (8-bit
    luminance; default: halfway from the page to the darkest pixel on a light page, to the
    brightest on a dark one, so faint anti-aliased pencil counts; no ink below a contrast
    of 32)."""
    grey = np.asarray(Image.fromarray(_rgb(image)).convert("L")).astype(np.float32)
    width = stroke if stroke is not None else max(1, round(min(grey.shape) * STROKE_FRACTION))
    if width < 1:
        raise UserError(f"scribble stroke width must be >= 1, got {width}")
    paper = float(np.median(grey))
    light = paper >= (threshold if threshold is not None else 128)
    if threshold is None:
        far = float(grey.min() if light else grey.max())
        threshold = (paper + far) / 2 if abs(paper - far) >= MIN_CONTRAST else far
    ink = grey < threshold if light else grey > threshold
    r = (width - 1) / 2  # a disc `width` pixels across
    yy, xx = np.mgrid[:width, :width]
    disc = (yy - r) ** 2 + (xx - r) ** 2 <= (width / 2) ** 2
    return _white_on_black(ndimage.binary_dilation(thin(ink), structure=disc))


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "none": none,
    "canny": canny,
    "scribble": scribble,
    "sketch": scribble,
}


def preprocess(image: Image.Image, kind: str, **options: float) -> Image.Image:
    """`image` through the preprocessor `kind` (a PREPROCESSORS name) with its options
    (canny's `low` / `high`, scribble's `threshold` / `stroke`)."""
    fn = PREPROCESSORS.get(kind)
    if fn is None:
        raise UserError(f"unknown control preprocessor {kind!r}; choose one of "
                        f"{', '.join(sorted(PREPROCESSORS))}")  # fmt: skip
    known = list(inspect.signature(fn).parameters)[1:]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"preprocessor {kind!r} takes {', '.join(known) or 'no options'}, "
                        f"not {', '.join(unknown)}")  # fmt: skip
    return fn(image, **options)

"""``photos[:RES][:N][:heldout]``: crops of real photographs, deterministic per index and seed.

Training stream (default): item i of seed s is drawn from ``np.random.default_rng([s, i])``:
one of the training photos (uniformly), a square crop of side RES to 2 RES at a uniform
position, resized to RES with Lanczos (a downscale, never an upscale: the crops stay sharp),
a horizontal flip with probability 1/2 and mild colour jitter (brightness and saturation
x 0.9-1.1). N (default 100,000) is the stream's length; the seed selects the stream.

Held-out stream (``:heldout``): scikit-learn's two sample photos, which no training stream
touches, cut into RES crops on a grid of stride RES / 2 at native scale, with no jitter; the
same list for every seed (N caps its length).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from ..data import DataKind, ImageDataset, parse_res_length_flag
from ..errors import UserError
from ..io.images import from_pil

DEFAULT_RESOLUTION = 64
PHOTOS_LENGTH = 100_000
MAX_SCALE = 2.0  # a crop's side is RES to MAX_SCALE * RES before resizing
JITTER = 0.1  # brightness and saturation factors in 1 +- JITTER


@dataclass(frozen=True)
class Photo:
    """One bundled photograph: the package and file that hold it, what it shows, its licence."""

    package: str
    path: str
    caption: str
    licence: str
    heldout: bool = False


PHOTOS = (
    Photo("skimage", "data/astronaut.png", "a photo of an astronaut",
          "NASA (Eileen Collins), public domain"),
    Photo("skimage", "data/chelsea.png", "a photo of a cat", "CC0, Stefan van der Walt"),
    Photo("skimage", "data/coffee.png", "a photo of a cup of coffee", "CC0, Rachel Michetti"),
    Photo("skimage", "data/rocket.jpg", "a photo of a rocket launch", "SpaceX, public domain"),
    Photo("skimage", "data/motorcycle_left.png", "a photo of a motorcycle",
          "Middlebury 2014 stereo benchmark (Scharstein et al.), research dataset"),
    Photo("skimage", "data/hubble_deep_field.jpg", "a photo of galaxies in deep space",
          "NASA Hubble, public domain"),
    Photo("skimage", "data/retina.jpg", "a photo of a retina",
          "CC0, Mikael Häggström (Wikimedia)"),
    Photo("skimage", "data/ihc.png", "a micrograph of stained tissue",
          "CMMI, no known copyright restrictions"),
    Photo("skimage", "data/brick.png", "a photo of a brick wall", "CC0 (CC0Textures)"),
    Photo("skimage", "data/grass.png", "a photo of grass", "CC0 (linolafett, DeviantArt)"),
    Photo("skimage", "data/gravel.png", "a photo of gravel", "CC0 (CC0Textures)"),
    Photo("skimage", "data/camera.png", "a photo of a man with a camera", "CC0, Lav Varshney"),
    Photo("skimage", "data/coins.png", "a photo of old coins",
          "Brooklyn Museum, no known copyright restrictions"),
    Photo("sklearn", "datasets/images/china.jpg", "a photo of a temple",
          "CC BY 2.0, danielbuechele (Flickr)", heldout=True),
    Photo("sklearn", "datasets/images/flower.jpg", "a photo of a flower",
          "CC BY 2.0, vultilion (Flickr)", heldout=True),
)  # fmt: skip
TRAIN = tuple(p for p in PHOTOS if not p.heldout)
HELDOUT = tuple(p for p in PHOTOS if p.heldout)


@functools.cache
def load_photo(photo: Photo) -> np.ndarray:
    """(H, W, 3) uint8 RGB (grey photos repeated over three channels), read from its package."""
    try:
        with resources.as_file(resources.files(photo.package) / photo.path) as path:
            img = Image.open(path)
            img.load()
    except ModuleNotFoundError:
        raise UserError("the photos data needs scikit-image's bundled photos: "
                        "pip install 'latentforge[photos]'") from None  # fmt: skip
    except OSError as e:
        raise UserError(
            f"could not read the bundled photo {photo.package}/{photo.path}: {e}"
        ) from None
    return np.asarray(img.convert("RGB"))


def _jitter(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32)
    brightness, saturation = rng.uniform(1 - JITTER, 1 + JITTER, size=2)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = grey[..., None] + saturation * (x - grey[..., None])
    return np.clip(x * brightness, 0, 255).round().astype(np.uint8)


class PhotosDataset(ImageDataset):
    """Crops of bundled photographs (module docstring): image i is a pure function of (i, seed)
    for the training stream, and of i alone for the held-out one."""

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        length: int | None = None,
        *,
        heldout: bool = False,
        seed: int = 0,
        spec: str | None = None,
    ) -> None:
        super().__init__(spec=spec or f"photos:{resolution}", resolution=resolution, channels=3)
        self.heldout, self.seed = heldout, seed
        self.procedural = not heldout
        if heldout:
            self.grid = self._grid(resolution)
            length = len(self.grid) if length is None else min(length, len(self.grid))
        self.length = PHOTOS_LENGTH if length is None else length
        if self.length < 1:
            raise UserError(f"photos dataset length must be >= 1, got {self.length}")

    @staticmethod
    def _grid(res: int) -> list[tuple[Photo, int, int]]:
        stride = max(res // 2, 1)
        cells = []
        for photo in HELDOUT:
            h, w = load_photo(photo).shape[:2]
            cells += [(photo, y, x) for y in range(0, h - res + 1, stride)
                      for x in range(0, w - res + 1, stride)]  # fmt: skip
        return cells

    def __len__(self) -> int:
        return self.length

    def crop(self, i: int) -> tuple[Photo, np.ndarray]:
        """The photo item i comes from and the item as an (RES, RES, 3) uint8 array."""
        i, res = self._index(i), self.resolution
        if self.heldout:
            photo, y, x = self.grid[i]
            return photo, load_photo(photo)[y : y + res, x : x + res]
        rng = np.random.default_rng([self.seed, operator.index(i)])
        photo = TRAIN[rng.integers(len(TRAIN))]
        pixels = load_photo(photo)
        h, w = pixels.shape[:2]
        side = min(int(res * rng.uniform(1.0, MAX_SCALE) + 0.5), h, w)
        y, x = rng.integers(h - side + 1), rng.integers(w - side + 1)
        img = Image.fromarray(pixels[y : y + side, x : x + side])
        if side != res:
            img = img.resize((res, res), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return photo, _jitter(img, rng)

    def __getitem__(self, i: int) -> dict[str, Any]:
        photo, pixels = self.crop(i)
        return {"image": from_pil(Image.fromarray(pixels)), "label": -1, "caption": photo.caption}


# ----- the data spec: photos[:RES][:N][:heldout] ----------------------------------------------
_USAGE = "photos[:RES][:N][:heldout]"
_RANGE = (16, 256)  # the smallest training photo is 300 px high


def _parse_photos(rest: str, spec: str) -> tuple[dict[str, Any], bool]:
    return parse_res_length_flag("photos", rest, spec, flag="heldout",
                                 resolution=DEFAULT_RESOLUTION)  # fmt: skip


def _build_photos(opts: dict[str, Any], seed: int, spec: str) -> PhotosDataset:
    return PhotosDataset(opts["resolution"], opts.get("length"),
                         heldout=opts.get("heldout", False), seed=seed, spec=spec)  # fmt: skip


PHOTOS_KIND = DataKind("photos", _USAGE, _RANGE, _parse_photos, _build_photos)

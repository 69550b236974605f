"""Datasets behind the ``--data SPEC`` strings: ``shapes``, ``digits`` and ``folder:PATH``.

Every dataset yields ``{"image": (C, H, W) float in [-1, 1], "label": int (-1 if none),
"caption": str ('' if none)}``, so the default DataLoader collate works for all of them.

Specs (``parse_spec`` / ``load_dataset``):

- ``digits[:RES]`` -- scikit-learn's bundled 8x8 handwritten digits (1,797 images), upsampled
  bilinearly to RES (default 16); one channel, labels 0-9, captions "a handwritten seven".
- ``shapes[:RES][:N][:holdout]`` -- the procedural captioned shapes (``training/shapes.py``),
  RES in 16..512 (default 64), N images (default 100,000); ``holdout`` redraws every scene that
  contains a ``HELD_OUT`` (colour, shape) pair, as used to train the default text-to-image
  model. Without it nothing is excluded. Image i is a pure function of (i, seed).
- ``folder:PATH[:RES]`` -- images found recursively under PATH (png, jpg, jpeg, webp, bmp, gif),
  RGB, centre-cropped and resized to RES (default 64). Captions from ``metadata.jsonl``
  (``file_name`` + ``text``, Hugging Face imagefolder) or ``NAME.txt`` sidecars; labels from
  the first-level sub-folder names when every image lives in a sub-folder.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import UserError
from ..io.images import from_pil
from .shapes import (
    BACKGROUND_COLOURS,
    COLOURS,
    SHAPES,
    SIZES,
    canonical_caption,
    is_held_out,
    render_shapes,
    sample_caption,
    shapes_record,
)
from .shapes import DEFAULT_RESOLUTION as SHAPES_RESOLUTION

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
DIGITS_RESOLUTION = 16
FOLDER_RESOLUTION = 64
SHAPES_LENGTH = 100_000
_RESOLUTION_RANGE = {"digits": (8, 512), "shapes": (16, 512), "folder": (8, 4096)}
_UNKNOWN = "unknown data spec {!r}; use shapes[:RES], digits[:RES] or folder:PATH"


class ImageDataset(torch.utils.data.Dataset):
    """Base class: square images in [-1, 1] with optional integer labels and captions."""

    def __init__(
        self,
        *,
        spec: str,
        resolution: int,
        channels: int,
        class_names: list[str] | None = None,
    ) -> None:
        self.spec = spec
        self.resolution = resolution
        self.channels = channels
        self.class_names = list(class_names or [])
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def _index(self, i: int) -> int:
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.spec!r} ({n} images)")
        return i % n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(spec={self.spec!r}, n={len(self)}, "
            f"resolution={self.resolution}, channels={self.channels}, "
            f"num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


class DigitsDataset(ImageDataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16), bilinearly upsampled, ink = +1."""

    def __init__(self, resolution: int = DIGITS_RESOLUTION, *, spec: str | None = None) -> None:
        super().__init__(
            spec=spec or f"digits:{resolution}",
            resolution=resolution,
            channels=1,
            class_names=[str(d) for d in range(10)],
        )
        images, labels = _digits_arrays()
        x = torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)  # (N, 1, 8, 8)
        if resolution != 8:
            # A convex combination of the 8x8 values, so the range stays inside [-1, 1].
            x = F.interpolate(
                x, size=(resolution, resolution), mode="bilinear", align_corners=False
            )
        self._images = x.contiguous()
        self._labels = labels.tolist()

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        label = self._labels[i]
        return {
            "image": self._images[i].clone(),
            "label": label,
            "caption": f"a handwritten {DIGIT_WORDS[label]}",
        }


# ---------------------------------------------------------------- shapes


class ShapesDataset(ImageDataset):
    """Procedural captioned shapes; image i is a pure function of (i, seed).

    ``exclude(record) -> bool`` re-draws (deterministically) every scene it rejects, e.g.
    ``exclude=is_held_out`` keeps the HELD_OUT (colour, shape) pairs out of training.
    ``record(i)`` gives the attribute record behind image i (see ``shapes_record``).
    """

    def __init__(
        self,
        resolution: int = SHAPES_RESOLUTION,
        length: int = SHAPES_LENGTH,
        *,
        seed: int = 0,
        exclude: Callable[[dict], bool] | None = None,
        spec: str | None = None,
    ) -> None:
        super().__init__(spec=spec or f"shapes:{resolution}", resolution=resolution, channels=3)
        if length < 1:
            raise UserError(f"shapes dataset length must be >= 1, got {length}")
        self.length = length
        self.seed = seed
        self.exclude = exclude

    def __len__(self) -> int:
        return self.length

    def record(self, i: int) -> dict:
        return shapes_record(self._index(i), self.seed, self.resolution, exclude=self.exclude)

    def caption(self, i: int) -> str:
        i = self._index(i)
        return sample_caption(self.record(i), i, self.seed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        record = self.record(i)
        return {
            "image": from_pil(render_shapes(record, self.resolution)),
            "label": -1,
            "caption": sample_caption(record, i, self.seed),
        }


# ---------------------------------------------------------------- folder


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, metadata.jsonl files) under root, sorted, hidden entries skipped."""
    images, metadata = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            path = Path(dirpath) / name
            if name == "metadata.jsonl":
                metadata.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
    return images, metadata


def _read_metadata(files: list[Path], root: Path) -> dict[str, str]:
    """Captions keyed by image path relative to root, from imagefolder metadata.jsonl files."""
    captions: dict[str, str] = {}
    for meta in files:
        base = meta.parent.relative_to(root)
        lines = meta.read_text(encoding="utf-8").splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{meta}:{lineno}: expected a JSON object with 'file_name' and 'text'"
                ) from None
            text = row.get("text", row.get("caption", ""))
            captions[os.path.normpath(base / name)] = str(text or "").strip()
    return captions


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # Pillow raises many types for bad files; any of them means skip
        return False


def _load_rgb(path: Path, resolution: int) -> Image.Image:
    """Open -> EXIF-rotate -> RGB (alpha over white) -> centre crop -> resize."""
    with Image.open(path) as img:
        img.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced size
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale PNGs
        arr = np.asarray(img, dtype=np.float32)
        arr = arr * (255 / 65535) if arr.max() > 255 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)


class FolderDataset(ImageDataset):
    """A folder of images (recursive), validated once at construction.

    Unreadable files are skipped with one warning. A file that becomes unreadable later is
    replaced by the next readable one (with a warning) so an epoch never crashes.
    """

    def __init__(
        self, root: str | Path, resolution: int = FOLDER_RESOLUTION, *, spec: str | None = None
    ) -> None:
        root = Path(root).expanduser()
        spec = spec or f"folder:{root}"
        if not root.exists():
            raise UserError(f"data folder {str(root)!r} does not exist (spec {spec!r})")
        if not root.is_dir():
            raise UserError(f"data folder {str(root)!r} is not a directory (spec {spec!r})")
        found, metadata = _find_images(root)
        if not found:
            exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
            raise UserError(f"no images ({exts}) found under {str(root)!r} (spec {spec!r})")
        readable = [_is_readable(p) for p in found]
        good = [p for p, ok in zip(found, readable, strict=True) if ok]
        bad = [p for p, ok in zip(found, readable, strict=True) if not ok]
        if bad:
            names = ", ".join(str(p.relative_to(root)) for p in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            warnings.warn(
                f"skipping {len(bad)} unreadable image file(s) under {str(root)!r}: {names}{more}",
                stacklevel=2,
            )
        if not good:
            raise UserError(f"none of the {len(found)} image files under {str(root)!r} is readable")

        rel = [p.relative_to(root) for p in good]
        labelled = all(len(r.parts) > 1 for r in rel)
        class_names = sorted({r.parts[0] for r in rel}) if labelled else []
        super().__init__(spec=spec, resolution=resolution, channels=3, class_names=class_names)
        self.root = root
        self.files = good
        index = {name: k for k, name in enumerate(class_names)}
        self.labels = [index[r.parts[0]] for r in rel] if labelled else [-1] * len(rel)
        meta = _read_metadata(metadata, root)
        self.captions = [
            meta[key] if (key := os.path.normpath(r)) in meta else self._sidecar(p)
            for p, r in zip(good, rel, strict=True)
        ]
        self._broken: set[int] = set()

    @staticmethod
    def _sidecar(path: Path) -> str:
        txt = path.with_suffix(".txt")
        try:
            return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        except (OSError, UnicodeDecodeError):
            return ""

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if j in self._broken:
                continue
            try:
                image = from_pil(_load_rgb(self.files[j], self.resolution))
            except Exception as e:  # any decode failure: never crash an epoch
                self._broken.add(j)
                warnings.warn(
                    f"could not read {str(self.files[j])!r} ({type(e).__name__}: {e}); "
                    "using the next image instead",
                    stacklevel=2,
                )
                continue
            return {"image": image, "label": self.labels[j], "caption": self.captions[j]}
        raise UserError(f"no image under {str(self.root)!r} is readable any more")


# ---------------------------------------------------------------- specs


def _resolution(kind: str, text: str, spec: str) -> int:
    lo, hi = _RESOLUTION_RANGE[kind]
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise UserError(f"bad data spec {spec!r}: resolution must be an integer in {lo}..{hi}")
    return int(text)


def _parse(spec: str) -> tuple[str, dict[str, Any], bool]:
    """(kind, options, whether the spec stated the resolution)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(_UNKNOWN.format(spec))
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "digits":
        if rest:
            return kind, {"resolution": _resolution(kind, rest, spec)}, True
        return kind, {"resolution": DIGITS_RESOLUTION}, False
    if kind == "shapes":
        opts: dict[str, Any] = {"resolution": SHAPES_RESOLUTION}
        ints = 0
        for part in rest.split(":") if rest else []:
            if part.lower() == "holdout":
                opts["holdout"] = True
            elif part.isdigit() and ints == 0:
                opts["resolution"] = _resolution(kind, part, spec)
                ints = 1
            elif part.isdigit() and ints == 1 and int(part) > 0:
                opts["length"] = int(part)
                ints = 2
            else:
                raise UserError(
                    f"bad data spec {spec!r}: expected shapes[:RES][:N][:holdout] "
                    f"(RES in 16..512, N > 0)"
                )
        return kind, opts, ints > 0
    if kind == "folder":
        path = rest
        if not path:
            raise UserError(f"bad data spec {spec!r}: give a path, folder:PATH")
        m = re.fullmatch(r"(.+):(\d+)", path)
        if m and not Path(path).expanduser().exists():
            return kind, {"path": m[1], "resolution": _resolution(kind, m[2], spec)}, True
        return kind, {"path": path, "resolution": FOLDER_RESOLUTION}, False
    raise UserError(_UNKNOWN.format(spec))


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"shapes:32"`` -> ``("shapes", {"resolution": 32})``; raises UserError on a bad spec.

    Options always include ``resolution`` (the default when unstated); shapes adds ``length``
    and ``holdout`` only when the spec states them; folder adds ``path``.
    """
    kind, opts, _ = _parse(spec)
    return kind, opts


def load_dataset(spec: str, *, seed: int = 0, resolution: int | None = None) -> ImageDataset:
    """Build the dataset for ``spec`` (see the module docstring for the spec grammar).

    ``seed`` selects the shapes stream (digits and folders are fixed). ``resolution``
    overrides the default resolution; it is an error if the spec states a different one.
    """
    kind, opts, stated = _parse(spec)
    if resolution is not None:
        if stated and resolution != opts["resolution"]:
            raise UserError(
                f"data spec {spec!r} says resolution {opts['resolution']} "
                f"but {resolution} was requested"
            )
        opts["resolution"] = _resolution(kind, str(resolution), spec)
    res = opts["resolution"]
    if kind == "digits":
        return DigitsDataset(res, spec=spec)
    if kind == "shapes":
        exclude = is_held_out if opts.get("holdout") else None
        length = opts.get("length", SHAPES_LENGTH)
        return ShapesDataset(res, length, seed=seed, exclude=exclude, spec=spec)
    return FolderDataset(opts["path"], res, spec=spec)


# ---------------------------------------------------------------- oversampling

_ATTRIBUTES = {**dict.fromkeys(SIZES, "size"), **dict.fromkeys(COLOURS, "colour"),
               **dict.fromkeys(SHAPES, "shape")}  # fmt: skip


def parse_oversample(
    rules: tuple[str, ...] | list[str], option: str = "--oversample"
) -> list[tuple[dict[str, str], float]]:
    """``["small star on gray=3"]`` -> ``[({"size": "small", "shape": "star", "background":
    "gray"}, 3.0)]``.

    A rule is ``WORDS [on COLOUR]=FACTOR``: WORDS name one object by its size, colour and/or
    shape (any of them, at most one of each), ``on COLOUR`` the image's background (a palette
    colour or gray); FACTOR > 0 scales how often an image holding such an object is drawn
    (``--oversample``) or how much its pixels weigh in the loss (``--object-weight``). Raises
    UserError, naming ``option``, on anything else.
    """
    parsed = []
    for rule in rules:
        words, sep, factor = str(rule).rpartition("=")
        attrs: dict[str, str] = {}
        head, on, background = f" {words.lower()}".partition(" on ")
        if on:
            background = re.sub(r"^an? |\s+background$", "", background.strip())
            if background in BACKGROUND_COLOURS:
                attrs["background"] = background
            else:
                head = ""  # a bad background: the rule is rejected below
        for word in head.split():
            kind = _ATTRIBUTES.get(word)
            if kind is None or kind in attrs:
                attrs = {}
                break
            attrs[kind] = word
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not sep or not attrs or not value > 0 or value == float("inf"):
            raise UserError(
                f"bad {option} {rule!r}: expected 'WORDS [on COLOUR]=FACTOR', WORDS one "
                f"object's size, colour and/or shape ({', '.join([*SIZES, *COLOURS, *SHAPES])}), "
                f"COLOUR the background (a colour or gray), FACTOR > 0"
            )
        parsed.append((attrs, value))
    return parsed


ObjectRules = list[tuple[dict[str, str], float]]  # parse_oversample's result


def object_rules(
    dataset: ImageDataset, rules: tuple[str, ...] | list[str], option: str
) -> ObjectRules:
    """``option``'s rules parsed (``parse_oversample``), after checking that ``dataset`` is
    shapes data, the only kind whose attribute records say what each image holds."""
    parsed = parse_oversample(rules, option)
    if not isinstance(dataset, ShapesDataset):
        raise UserError(f"{option} needs shapes data, whose images list their objects; "
                        f"{dataset.spec!r} does not")  # fmt: skip
    return parsed


def _is(record: dict, obj: dict, attrs: dict[str, str]) -> bool:
    """Whether an object of a record has every attribute a rule names (the background is the
    record's)."""
    return all((record if k == "background" else obj)[k] == v for k, v in attrs.items())


def sample_weights(dataset: ImageDataset, rules: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Per-image draw weights (float64, one per dataset index) for ``--oversample`` rules: the
    product of the factors of the rules an object of the image matches (1 when none does).
    Only for ``shapes`` data (``object_rules``)."""
    parsed = object_rules(dataset, rules, "--oversample")
    weights = torch.ones(len(dataset), dtype=torch.float64)
    matched = [0] * len(parsed)
    for i in range(len(dataset)):
        record = dataset.record(i)
        for k, (attrs, factor) in enumerate(parsed):
            if any(_is(record, o, attrs) for o in record["objects"]):
                weights[i] *= factor
                matched[k] += 1
    for rule, count in zip(rules, matched, strict=True):
        if not count:
            warnings.warn(f"--oversample {rule!r} matches no image of {dataset.spec!r} "
                          "(a :holdout spec leaves out the held-out colour/shape pairs)",
                          stacklevel=2)  # fmt: skip
    return weights


def object_weights(
    dataset: ImageDataset, rules: ObjectRules, indices: torch.Tensor, side: int
) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, side, side) for ``--object-weight`` rules (parsed once by
    ``object_rules``) on a side x side grid over images ``indices`` of shapes data: a cell
    weighs the product of the factors of the rules whose object covers it (the object's
    bounding box grown by one cell), 1 elsewhere. Cells are those of the latent grid when
    ``side`` is the latent side."""
    out = torch.ones(len(indices), 1, side, side)
    for b, i in enumerate(indices.tolist()):
        record = dataset.record(int(i))
        for o in record["objects"]:
            factor = math.prod(f for attrs, f in rules if _is(record, o, attrs))
            if factor != 1:
                out[b, 0][_cells(o, record["resolution"], side)] *= factor
    return out


def _cells(obj: dict, resolution: int, side: int) -> torch.Tensor:
    """(side, side) bool: the cells of a side x side grid over the image whose centres lie in
    the object's bounding box (half-side = radius) grown by one cell."""
    centres = (torch.arange(side) + 0.5) / side  # fractions of the image side
    reach = obj["radius"] / resolution + 1 / side
    rows = (centres - obj["cy"] / resolution).abs() <= reach
    cols = (centres - obj["cx"] / resolution).abs() <= reach
    return rows[:, None] & cols[None, :]


def region_captions(
    dataset: ImageDataset, indices: torch.Tensor, which: torch.Tensor, side: int
) -> tuple[list[str | None], torch.Tensor]:
    """Region captions for images ``indices`` of shapes data (``--region-captions``): where
    ``which`` is 0 or 1 and the image holds two objects, the caption of that object alone, as
    regional prompting writes a box's prompt (``pipelines/layout.py``: the canonical one-object
    caption with the image's background), and a (B, 1, side, side) loss weight that is 0 on the
    other object's box grown by one cell (1 elsewhere); None and all-ones for the other images.

    At inference every box is denoised under such a prompt while the image also holds the other
    objects. Training on it teaches the U-Net that a one-object caption names what is in its box
    and says nothing about the rest, instead of asking for an image with that object alone.
    """
    captions: list[str | None] = []
    weight = torch.ones(len(indices), 1, side, side)
    for b, (i, k) in enumerate(zip(indices.tolist(), which.tolist(), strict=True)):
        record = dataset.record(int(i))
        objects = record["objects"]
        if k not in (0, 1) or len(objects) != 2:
            captions.append(None)
            continue
        kept, other = objects[k], objects[1 - k]
        captions.append(canonical_caption({"objects": [kept], "background": record["background"]}))
        weight[b, 0][_cells(other, record["resolution"], side)] = 0
    return captions, weight


def random_crops(images: torch.Tensor, size: int, step: int, g: torch.Generator) -> torch.Tensor:
    """A size x size crop of each image at a random offset that is a multiple of `step` (so the
    crop's low-res version and its latents line up with the full image's grid)."""
    B, _, H, W = images.shape
    n_y, n_x = (H - size) // step + 1, (W - size) // step + 1
    ys = torch.randint(n_y, (B,), generator=g, device=g.device).tolist()
    xs = torch.randint(n_x, (B,), generator=g, device=g.device).tolist()
    return torch.stack(
        [im[:, y * step : y * step + size, x * step : x * step + size]
         for im, y, x in zip(images, ys, xs, strict=True)]
    )  # fmt: skip


def held_out_images(spec: str, n: int, data_seed: int) -> torch.Tensor:
    """The first n images of the stream `data_seed` of the data spec, (n, C, H, W) in [-1, 1]."""
    ds = load_dataset(spec, seed=data_seed)
    if len(ds) < n:
        raise UserError(f"{spec!r} has {len(ds)} images; asked for {n}")
    return torch.stack([ds[i]["image"] for i in range(n)])

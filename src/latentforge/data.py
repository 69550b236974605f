"""Datasets behind the ``--data SPEC`` strings: ``shapes``, ``digits`` and ``folder:PATH``.

Every dataset yields ``{"image": (C, H, W) float in [-1, 1], "label": int (-1 if none),
"caption": str ('' if none)}``, so the default DataLoader collate works for all of them.

Specs (``parse_spec`` / ``load_dataset``):

- ``digits[:RES]`` -- scikit-learn's bundled 8x8 handwritten digits (1,797 images), upsampled
  bilinearly to RES (default 16); one channel, labels 0-9, captions "a handwritten seven".
- ``shapes[:RES][:N][:holdout]`` -- the procedural captioned shapes (the shapes wing, ``shapes/``),
  RES in 16..512 (default 64), N images (default 100,000); ``holdout`` redraws every scene that
  contains a ``HELD_OUT`` (colour, shape) pair, as used to train the default text-to-image
  model. Without it nothing is excluded. Image i is a pure function of (i, seed).
- ``folder:PATH[:RES]`` -- images found recursively under PATH (png, jpg, jpeg, webp, bmp, gif),
  RGB, centre-cropped and resized to RES (default 64). Captions from ``metadata.jsonl``
  (``file_name`` + ``text``, Hugging Face imagefolder) or ``NAME.txt`` sidecars; labels from
  the first-level sub-folder names when every image lives in a sub-folder.
- ``wds:SHARDS[:RES][:shuffle=N][:workers=N]`` -- WebDataset tar shards, streamed: a path with
  brace ranges (``/data/{000000..000099}.tar``), several joined by ``::``, or ``pipe:COMMAND``
  for an object store; images as for folders (RES default: the size ``data pack`` wrote, else
  64), caption ``.txt`` / ``.json``, class ``.cls``; class names from the ``shards.json`` that
  ``latentforge data pack`` writes.
  ``shuffle``: the shuffle buffer (default 1000 samples), ``workers``: DataLoader worker
  processes per rank (default 0). Training streams it (``training/stream.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import operator
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import UserError
from .io.images import from_pil

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
DIGITS_RESOLUTION = 16
FOLDER_RESOLUTION = 64


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

    # ----- hooks a dataset's wing may fill in (the shapes wing does) ---------------------------
    #: the layout planner (pipelines/layout.py) a text model trained on this data uses
    default_layout: str | None = None
    #: whether the seed selects a stream of new images (held-out images come from seed + 1)
    procedural: bool = False
    #: whether each image's record lists its objects (the object rules' hooks below work)
    lists_objects: bool = False
    #: whether the data is a stream (wds:) that training reads in order, not by index
    streamed: bool = False

    def object_rules(self, rules: tuple[str, ...] | list[str], option: str) -> Any:
        """`--oversample` / `--object-weight` rules, parsed for this data: only data whose
        images list their objects can take them."""
        raise UserError(f"{option} needs data whose images list their objects (shapes); "
                        f"{self.spec!r} does not")  # fmt: skip

    def sample_weights(self, rules: tuple[str, ...] | list[str]) -> torch.Tensor:
        """Per-image draw weights (float64, one per index) for `--oversample` rules."""
        self.object_rules(rules, "--oversample")
        raise NotImplementedError

    def object_weights(self, rules: Any, indices: torch.Tensor, side: int) -> torch.Tensor:
        """Per-cell loss weights (B, 1, side, side) for parsed `--object-weight` rules."""
        raise NotImplementedError

    def region_captions(
        self, indices: torch.Tensor, which: torch.Tensor, side: int
    ) -> tuple[list[str | None], torch.Tensor]:
        """One-object captions and loss weights for `--region-captions`."""
        raise UserError(f"--region-captions needs data whose images list their objects "
                        f"(shapes); {self.spec!r} does not")  # fmt: skip

    def read_back(self, images: torch.Tensor) -> dict | None:
        """How well images[i], a copy of item i through a lossy round trip (a VAE), still shows
        what item i holds, by the data's own reader; None for data without one."""
        return None

    def control_source(self, i: int, kind: str) -> Image.Image | None:
        """The picture `train controlnet` turns into item i's control image with the
        preprocessor `kind` (preprocess.py); None (the default): the item's own image. A wing
        may draw one instead (shapes: a hand-drawn outline of the scene for scribble)."""
        return None

    def control_caption(self, i: int, kind: str) -> str | None:
        """Item i's caption for `train controlnet` with the preprocessor `kind`: None (the
        default) for its own; a wing may leave out what the control says (shapes: where the
        sketched objects are and how large), so the ControlNet has to learn it."""
        return None

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


def _load_rgb(path: Path | IO[bytes], resolution: int, mode: str = "RGB") -> Image.Image:
    """Open -> EXIF-rotate -> RGB (alpha over white) -> centre crop -> resize; `mode` "L"
    gives one channel instead (greyscale shards)."""
    with Image.open(path) as img:
        img.draft(mode, (resolution, resolution))  # JPEG: decode at reduced size
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale PNGs
        arr = np.asarray(img, dtype=np.float32)
        arr = arr * (255 / 65535) if arr.max() > 255 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert(mode)
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


# ---------------------------------------------------------------- wds: WebDataset shards

SHARDS_INFO = "shards.json"  # what `latentforge data pack` writes beside its shards
CAPTION_KEYS = ("txt", "caption", "text")
WDS_PREVIEW = 64  # indexing a stream reads (at most) this many of its first samples


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise UserError(
            "wds: data needs the webdataset package: pip install 'latentforge[wds]'"
        ) from None
    return webdataset


class ShardDataset(ImageDataset):
    """WebDataset tar shards (img2dataset's and LAION's format), read as a stream.

    A sample is the files of one key in a tar: an image (png, jpg, jpeg, webp), a caption
    (``.txt``, or ``.json`` with "caption" / "text") and an optional class (``.cls``, or
    ``.json``'s "label"). Training streams the shards (`training/stream.py`: split across
    ranks and DataLoader workers, shuffled through a buffer, resumable); indexing reads only
    the first WDS_PREVIEW samples in shard order (sample grids, evaluation images), so
    `len()` is the length of that preview, not of the data.
    """

    streamed = True

    def __init__(
        self,
        urls: str,
        resolution: int = FOLDER_RESOLUTION,
        *,
        shuffle: int = 1000,
        workers: int = 0,
        spec: str | None = None,
    ) -> None:
        wds = _webdataset()
        spec = spec or f"wds:{urls}"
        self.urls = wds.shardlists.expand_urls(urls)
        self.shuffle, self.workers = shuffle, workers
        for url in self.urls:  # a missing local shard is a spec error, not a stream fault
            if not _is_remote(url) and not Path(url).is_file():
                raise UserError(f"wds: shard {url!r} does not exist (spec {spec!r})")
        info = _shards_info(self.urls[0])
        self._preview: list[dict[str, Any]] = []
        self._mode = {1: "L", 3: "RGB"}.get(info.get("channels", 0))
        if self._mode is None:  # no shards.json: the first image says
            first = next(self.raw_samples(self.urls[:1]), None)
            if first is None:
                raise UserError(f"wds: no readable sample in {self.urls[0]!r} (spec {spec!r})")
            with Image.open(io.BytesIO(_image_bytes(first))) as img:
                self._mode = "L" if img.mode in ("1", "L", "I", "I;16", "LA") else "RGB"
        super().__init__(
            spec=spec,
            resolution=resolution,
            channels=len(self._mode),
            class_names=info.get("class_names"),
        )

    def raw_samples(self, urls: list[str], errors: list | None = None) -> Any:
        """The undecoded samples ({"__key__", "png": bytes, ...}) of `urls` in order; a shard
        or tar entry that cannot be read is skipped and appended to `errors`."""

        def skip(e: BaseException) -> bool:
            if errors is not None:
                errors.append(f"{type(e).__name__}: {e}")
            return True

        wds = _webdataset()
        return wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=skip)

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """A raw sample -> {"image", "label", "caption"}; raises on a corrupt one."""
        image = _load_rgb(io.BytesIO(_image_bytes(sample)), self.resolution, self._mode)
        meta = json.loads(sample["json"]) if "json" in sample else {}
        caption = next((sample[k].decode("utf-8") for k in CAPTION_KEYS if k in sample), None)
        if caption is None:
            caption = str(meta.get("caption", meta.get("text", "")) or "")
        label = int(sample["cls"]) if "cls" in sample else int(meta.get("label", -1))
        if self.num_classes and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside the {self.num_classes} classes")
        return {"image": from_pil(image, self.channels), "label": label, "caption": caption.strip()}

    def _fill_preview(self) -> None:
        if self._preview:
            return
        for sample in self.raw_samples(self.urls):
            with contextlib.suppress(Exception):  # corrupt samples: skipped here as in training
                self._preview.append(self.decode(sample))
            if len(self._preview) == WDS_PREVIEW:
                break
        if not self._preview:
            raise UserError(f"wds: no readable sample in {self.spec!r}")

    def __len__(self) -> int:
        self._fill_preview()
        return len(self._preview)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self._fill_preview()
        item = self._preview[self._index(i)]
        return {**item, "image": item["image"].clone()}


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in ("png", "jpg", "jpeg", "webp", "bmp"):
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')!r} holds no image")


def _shards_info(url: str) -> dict[str, Any]:
    """The shards.json `data pack` wrote beside a local shard ({} if none or remote)."""
    path = None if _is_remote(url) else Path(url).parent / SHARDS_INFO
    if path is None or not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object")
    return info


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataKind:
    """One kind of data spec, `NAME[:OPTIONS]`: how to read its options and build its dataset.

    parse(rest, spec) -> (options with at least "resolution", whether the spec stated the
    resolution); build(options, seed, spec) -> the dataset. A dataset's wing registers its kind
    with `register_data_kind` (the shapes wing does), as a user's own data can.
    """

    name: str
    usage: str  # e.g. "digits[:RES]", named in errors
    resolution_range: tuple[int, int]
    parse: Callable[[str, str], tuple[dict[str, Any], bool]]
    build: Callable[[dict[str, Any], int, str], ImageDataset]


DATA_KINDS: dict[str, DataKind] = {}


def register_data_kind(kind: DataKind) -> None:
    DATA_KINDS[kind.name] = kind


def spec_resolution(kind: str, text: str, spec: str) -> int:
    """A resolution written in a spec, checked against the kind's range."""
    lo, hi = DATA_KINDS[kind].resolution_range
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise UserError(f"bad data spec {spec!r}: resolution must be an integer in {lo}..{hi}")
    return int(text)


def parse_res_length_flag(
    kind: str, rest: str, spec: str, *, flag: str, resolution: int
) -> tuple[dict[str, Any], bool]:
    """The options of a `KIND[:RES][:N][:FLAG]` spec (shapes, photos): {"resolution"
    (default `resolution`), "length" if N is given, FLAG: True if given}, and whether RES was
    stated. N must be > 0; anything else is a one-line error naming the grammar."""
    opts: dict[str, Any] = {"resolution": resolution}
    ints = 0
    for part in rest.split(":") if rest else []:
        if part.lower() == flag:
            opts[flag] = True
        elif part.isdigit() and ints == 0:
            opts["resolution"] = spec_resolution(kind, part, spec)
            ints = 1
        elif part.isdigit() and ints == 1 and int(part) > 0:
            opts["length"] = int(part)
            ints = 2
        else:
            lo, hi = DATA_KINDS[kind].resolution_range
            raise UserError(f"bad data spec {spec!r}: expected {DATA_KINDS[kind].usage} "
                            f"(RES in {lo}..{hi}, N > 0)")  # fmt: skip
    return opts, ints > 0


def _parse_digits(rest: str, spec: str) -> tuple[dict[str, Any], bool]:
    if rest:
        return {"resolution": spec_resolution("digits", rest, spec)}, True
    return {"resolution": DIGITS_RESOLUTION}, False


def _parse_folder(rest: str, spec: str) -> tuple[dict[str, Any], bool]:
    if not rest:
        raise UserError(f"bad data spec {spec!r}: give a path, folder:PATH")
    m = re.fullmatch(r"(.+):(\d+)", rest)
    if m and not Path(rest).expanduser().exists():
        return {"path": m[1], "resolution": spec_resolution("folder", m[2], spec)}, True
    return {"path": rest, "resolution": FOLDER_RESOLUTION}, False


register_data_kind(DataKind(
    "digits", "digits[:RES]", (8, 512), _parse_digits,
    lambda opts, seed, spec: DigitsDataset(opts["resolution"], spec=spec),
))  # fmt: skip
register_data_kind(DataKind(
    "folder", "folder:PATH", (8, 4096), _parse_folder,
    lambda opts, seed, spec: FolderDataset(opts["path"], opts["resolution"], spec=spec),
))  # fmt: skip


def _parse_wds(rest: str, spec: str) -> tuple[dict[str, Any], bool]:
    """URLS[:RES][:shuffle=N][:workers=N], the options read from the right (a shard name or a
    pipe: command does not end in one)."""
    opts: dict[str, Any] = {"shuffle": 1000, "workers": 0}
    stated = False
    while m := re.fullmatch(r"(.+):(?:(shuffle|workers)=)?(\d+)", rest):
        rest, key, value = m[1], m[2], m[3]
        if key is None:
            opts["resolution"], stated = spec_resolution("wds", value, spec), True
        else:
            opts[key] = int(value)
    if not rest:
        raise UserError(f"bad data spec {spec!r}: give shards, wds:PATH/{{000000..000009}}.tar")
    if not stated:  # packed shards: the size they were packed at
        first = _webdataset().shardlists.expand_urls(rest)[0]
        opts["resolution"] = _shards_info(first).get("resolution", FOLDER_RESOLUTION)
    return {**opts, "urls": rest}, stated


register_data_kind(DataKind(
    "wds", "wds:SHARDS[:RES]", (8, 4096), _parse_wds,
    lambda opts, seed, spec: ShardDataset(
        opts["urls"], opts["resolution"], shuffle=opts["shuffle"], workers=opts["workers"],
        spec=spec),
))  # fmt: skip


def _parse(spec: str) -> tuple[str, dict[str, Any], bool]:
    """(kind, options, whether the spec stated the resolution)."""
    *first, last = [k.usage for k in DATA_KINDS.values()]
    usages = f"{', '.join(first)} or {last}" if first else last
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"unknown data spec {spec!r}; use {usages}")
    name, _, rest = spec.strip().partition(":")
    kind = DATA_KINDS.get(name.lower())
    if kind is None:
        raise UserError(f"unknown data spec {spec!r}; use {usages}")
    opts, stated = kind.parse(rest, spec)
    return kind.name, opts, stated


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"shapes:32"`` -> ``("shapes", {"resolution": 32})``; raises UserError on a bad spec.

    Options always include ``resolution`` (the default when unstated); shapes adds ``length``
    and ``holdout`` only when the spec states them; folder adds ``path``.
    """
    kind, opts, _ = _parse(spec)
    return kind, opts


def load_dataset(spec: str, *, seed: int = 0, resolution: int | None = None) -> ImageDataset:
    """Build the dataset for ``spec`` (see the module docstring for the spec grammar).

    ``seed`` selects the stream of procedural data (digits and folders are fixed).
    ``resolution`` overrides the default resolution; it is an error if the spec states a
    different one.
    """
    kind, opts, stated = _parse(spec)
    if resolution is not None:
        if stated and resolution != opts["resolution"]:
            raise UserError(
                f"data spec {spec!r} says resolution {opts['resolution']} "
                f"but {resolution} was requested"
            )
        opts["resolution"] = spec_resolution(kind, str(resolution), spec)
    return DATA_KINDS[kind].build(opts, seed, spec)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Dataset items -> a batch: {"image": (B, C, H, W), "label": (B,), "caption": list}."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


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

"""`latentforge data pack SPEC OUT`: any data spec written as WebDataset tar shards, which
`--data wds:OUT/{000000..N}.tar` then streams (data.py's `ShardDataset`)."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from .options import quiet_option, seed_option

SHARD_NAME = "{:06d}.tar"


@click.group("data")
def data_group() -> None:
    """Data tools: pack a data spec into WebDataset shards."""


@data_group.command("pack")
@click.argument("spec")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="samples per shard")  # fmt: skip
@seed_option("the stream of procedural data (shapes) to pack")
@quiet_option
def pack_cmd(spec: str, out: str, shard_size: int, seed: int, quiet: bool) -> int:
    """Write every sample of SPEC (shapes, digits, folder:PATH, wds:...) as WebDataset shards
    OUT/000000.tar, ... (a PNG, a .txt caption and a .cls class each) and OUT/shards.json."""
    from ..data import load_dataset

    info = pack_shards(load_dataset(spec, seed=seed), Path(out), shard_size, quiet=quiet)
    if not quiet:
        last = SHARD_NAME.format(len(info["shards"]) - 1)
        click.echo(f"{info['count']} samples in {len(info['shards'])} shards -> "
                   f"--data 'wds:{Path(out) / ('{000000..' + last[:-4] + '}.tar')}'")  # fmt: skip
    return 0


def pack_shards(ds: Any, out: Path, shard_size: int, *, quiet: bool = True) -> dict:
    """Write `ds` (an `ImageDataset`) into shards of `shard_size` samples under `out`, which must
    not exist or be empty: everything is written into a temp folder beside it that is renamed
    into place at the end, so `out` holds all the shards or none. Returns shards.json's dict."""
    import torch
    from tqdm import tqdm

    from ..data import SHARDS_INFO
    from ..errors import UserError
    from ..io.checkpoint import replace_dir_atomic, write_error

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new one")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-pack-{out.name}-", dir=out.parent))
    except OSError as e:
        raise write_error(out, e) from None
    n = len(ds)
    counts = [min(shard_size, n - start) for start in range(0, n, shard_size)]
    threads = torch.get_num_threads()
    # one image at a time: OpenMP's fork and join costs more than these small tensors' maths
    torch.set_num_threads(1)
    try:
        with tqdm(total=n, unit="img", desc="packing", disable=quiet) as bar:
            for k, count in enumerate(counts):
                items = (ds[i] for i in range(k * shard_size, k * shard_size + count))
                _write_shard(tmp / SHARD_NAME.format(k), k * shard_size, items, bar)
        info = {
            "format": "webdataset",
            "spec": ds.spec,
            "count": n,
            "shards": [SHARD_NAME.format(k) for k in range(len(counts))],
            "counts": counts,
            "resolution": ds.resolution,
            "channels": ds.channels,
            "class_names": ds.class_names,
        }
        (tmp / SHARDS_INFO).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir_atomic(tmp, out)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _write_shard(path: Path, first: int, items: Any, bar: Any) -> None:
    """One tar: per sample KEY.png, KEY.txt (caption) and, when labelled, KEY.cls."""
    import webdataset as wds

    from ..io.images import to_pil

    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tar:
        for i, item in enumerate(items, first):
            png = io.BytesIO()
            to_pil(item["image"]).save(png, format="PNG", compress_level=1)
            sample = {"__key__": f"{i:09d}", "png": png.getvalue(),
                      "txt": item["caption"].encode("utf-8")}  # fmt: skip
            if item["label"] >= 0:
                sample["cls"] = str(item["label"]).encode()
            tar.write(sample)
            bar.update(1)

"""wds: data (WebDataset shards): `data pack` round trips, brace ranges, corrupt samples, the
split of shards across ranks and DataLoader workers, and exact resume of a stream, in one
process and under torchrun (gloo)."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentforge.cli import main
from latentforge.commands.data import pack_shards
from latentforge.data import ShardDataset, load_dataset, parse_spec
from latentforge.errors import UserError
from latentforge.training import TrainConfig, train_diffusion
from latentforge.training.stream import ShardStream, StreamLoader, resume_positions

pytest.importorskip("webdataset")


def _folder(root, n):
    """n distinct 8x8 images captioned "sample i" (the captions name the samples)."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"sample {i}")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 samples in 8 shards of 4, and the folder dataset they came from."""
    tmp = tmp_path_factory.mktemp("wds")
    ds = load_dataset(f"folder:{_folder(tmp / 'src', 32)}:8")
    pack_shards(ds, tmp / "shards", 4)
    return tmp / "shards", ds


def _spec(folder, last=7, opts=""):
    return f"wds:{folder}/{{000000..{last:06d}}}.tar{opts}"


def test_pack_reads_back_the_same_samples(shards):
    folder, ref = shards
    info = json.loads((folder / "shards.json").read_text())
    assert info["count"] == 32 and info["counts"] == [4] * 8 and info["resolution"] == 8
    ds = load_dataset(_spec(folder))
    assert isinstance(ds, ShardDataset) and len(ds.urls) == 8 and ds.resolution == 8
    assert len(ds) == 32 and ds.channels == 3
    for i in range(32):  # the preview reads the shards in order: the packed order
        a, b = ds[i], ref[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"], i
    # brace ranges pick shards: two of them, 8 samples
    assert len(load_dataset(_spec(folder).replace("{000000..000007}", "{000002..000003}"))) == 8
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]
    # pipe: commands (an object store's client) stream the same bytes
    piped = load_dataset(f"wds:pipe:cat {folder}/{{000000..000001}}.tar:8")
    assert [piped[i]["caption"] for i in range(len(piped))] == [f"sample {i}" for i in range(8)]
    assert torch.equal(piped[5]["image"], ref[5]["image"])


def test_pack_command_labels_and_errors(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["data", "pack", "digits:8", str(out), "--shard-size", "1000", "--quiet"]) == 0
    ds = load_dataset(f"wds:{out}/{{000000..000001}}.tar")
    ref = load_dataset("digits:8")
    assert ds.class_names == ref.class_names and ds.channels == 1 and ds.resolution == 8
    assert [ds[i]["label"] for i in range(20)] == [ref[i]["label"] for i in range(20)]
    # 8-bit PNGs: digits' bilinear values round to the nearest 1/127.5
    assert (ds[3]["image"] - ref[3]["image"]).abs().max() <= 1 / 255 + 1e-6
    capsys.readouterr()
    assert main(["data", "pack", "digits:8", str(out)]) == 2  # not an empty folder
    assert "not an empty folder" in capsys.readouterr().err
    for spec, match in [
        (f"wds:{tmp_path}/{{0..3}}.tar", "does not exist"),
        (f"wds:{out}/{{000000..000001}}.tar:5", "resolution"),
        ("wds:", "give shards"),
    ]:
        with pytest.raises(UserError, match=match):
            load_dataset(spec)
    kind, opts = parse_spec(f"wds:{out}/{{000000..000001}}.tar:32:shuffle=7:workers=2")
    assert (kind, opts["resolution"], opts["shuffle"], opts["workers"]) == ("wds", 32, 7, 2)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, shards):
    """A sample whose PNG is garbage is skipped with a warning naming the count; the stream
    goes on with the others."""
    folder, _ = shards
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(folder / "000000.tar") as src, tarfile.open(bad / "000000.tar", "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "000000001.png":
                data = b"\x89PNG not really"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    ds = load_dataset(f"wds:{bad}/000000.tar:8:shuffle=1")
    assert [ds[i]["caption"] for i in range(len(ds))] == ["sample 0", "sample 2", "sample 3"]
    loader = StreamLoader(ds, seed=0, rank=0, world=1, batch_size=3, consumed=0)
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt sample"):
        batch = loader.next()
    assert batch["caption"] == ["sample 0", "sample 2", "sample 3"]
    assert loader.state() == [{"epoch": 0, "offset": 4, "skipped": 1}]


def test_each_sample_once_per_epoch_across_ranks_and_workers(shards):
    """2 ranks x 2 DataLoader workers over 8 shards of 4: one epoch (16 samples a rank) holds
    all 32 samples, each once; the next epoch again, in another order."""
    folder, _ = shards
    ds = load_dataset(_spec(folder, opts=":shuffle=3:workers=2"))
    epochs = [[], []]
    for rank in range(2):
        loader = StreamLoader(ds, seed=5, rank=rank, world=2, batch_size=4, consumed=0)
        for k in range(8):
            epochs[k // 4] += loader.next()["caption"]
    for seen in epochs:
        assert sorted(seen) == sorted(f"sample {i}" for i in range(32))
    assert epochs[0] != epochs[1]
    with pytest.raises(UserError, match="each needs one"):
        ShardStream(ds, seed=0, rank=0, world=5, batch_size=4)


def test_resumed_stream_continues_with_the_same_batches(shards):
    """A loader started from another's saved positions (and its count of batches, which says
    the worker next in turn) yields the batches the first would have yielded next."""
    folder, _ = shards
    ds = load_dataset(_spec(folder, opts=":shuffle=5:workers=2"))
    straight = StreamLoader(ds, seed=1, rank=1, world=2, batch_size=3, consumed=0)
    first = [straight.next()["caption"] for _ in range(5)]
    resumed = StreamLoader(ds, seed=1, rank=1, world=2, batch_size=3, consumed=5,
                           start=straight.state())  # fmt: skip
    rest = [straight.next()["caption"] for _ in range(6)]
    assert [resumed.next()["caption"] for _ in range(6)] == rest
    assert first != rest[:5]


def test_a_stream_resumed_on_another_world_size_restarts_its_epoch(shards, capsys):
    folder, _ = shards
    ds = load_dataset(_spec(folder, opts=":workers=2"))
    saved = {
        "world": 2,
        "workers": 2,
        "ranks": [
            [{"epoch": 3, "offset": 5, "skipped": 1}, {"epoch": 2, "offset": 7, "skipped": 0}],
            [{"epoch": 3, "offset": 1, "skipped": 0}, {"epoch": 4, "offset": 2, "skipped": 0}],
        ],
    }
    assert resume_positions(ds, saved, 1, 2) == saved["ranks"][1]  # same world: exact
    start = resume_positions(ds, saved, 0, 1)
    assert start == [{"epoch": 2, "offset": 0, "skipped": 0}] * 2
    assert "restarting epoch 2" in capsys.readouterr().err


def _cfg(out, data, **kw):
    base = dict(data=data, out=str(out), preset="tiny", cond="class", max_steps=6,
                batch_size=4, warmup_steps=2, sample_every=0, ckpt_every=3, quiet=True)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digit-shards") / "shards"
    pack_shards(load_dataset("digits:8"), out, 300)
    return f"wds:{out}/{{000000..000005}}.tar:shuffle=50:workers=2"


def _same_checkpoints(a, b, step="step-0000006"):
    for name in ("model", "ema", "optimizer"):
        x = load_file(a / "checkpoints" / step / f"{name}.safetensors")
        y = load_file(b / "checkpoints" / step / f"{name}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    data = [json.loads((p / "checkpoints" / step / "state.json").read_text())["data"]
            for p in (a, b)]  # fmt: skip
    assert data[0] == data[1]
    return data[0]


def test_training_on_a_stream_resumes_exactly(tmp_path, digit_shards):
    """3 steps, stop, resume to 6 == 6 straight (weights, EMA, optimizer and stream position),
    with two DataLoader workers and 3 batches read (the resumed turn starts at worker 1)."""
    straight, split = tmp_path / "a", tmp_path / "b"
    assert train_diffusion(_cfg(straight, digit_shards)) == 0
    assert train_diffusion(_cfg(split, digit_shards, max_steps=3)) == 0
    assert train_diffusion(_cfg(split, digit_shards), resume=True) == 0
    log = [json.loads(line) for line in (split / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [3, 6]  # --log-every 50: at each run's last step
    assert all(line["images_per_s"] > 0 and 0 <= line["data_wait"][0] < 1 for line in log)
    data = _same_checkpoints(straight, split)
    assert data == {
        "world": 1,
        "workers": 2,
        "ranks": [
            [{"epoch": 0, "offset": 12, "skipped": 0}, {"epoch": 0, "offset": 12, "skipped": 0}]
        ],
    }


def test_stream_refuses_the_in_memory_caches(tmp_path, digit_shards):
    with pytest.raises(UserError, match="is a stream"):
        train_diffusion(_cfg(tmp_path, digit_shards, cond="text", cache_text=True))


def _torchrun(tmp_path, port, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", LATENTFORGE_DEVICE="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "latentforge.cli", *args]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on linux")
def test_torchrun_stream_kill_and_resume_is_exact(tmp_path, digit_shards):
    """Two processes (gloo, DDP) on wds: shards: stopped at step 3 and resumed to 6 equals 6
    uninterrupted, bit for bit (the same batches on each rank, the same all-reduce order)."""
    common = [
        "train",
        "diffusion",
        "--data",
        digit_shards,
        "--cond",
        "class",
        "--batch-size",
        "4",
        "--ckpt-every",
        "3",
        "--sample-every",
        "0",
        "--warmup-steps",
        "2",
        "--quiet",
    ]
    straight, split = tmp_path / "a", tmp_path / "b"
    _torchrun(tmp_path, 29531, *common, "--out", str(straight), "--max-steps", "6")
    _torchrun(tmp_path, 29532, *common, "--out", str(split), "--max-steps", "3")
    _torchrun(tmp_path, 29533, *common, "--out", str(split), "--max-steps", "6", "--resume")
    data = _same_checkpoints(straight, split)
    assert data["world"] == 2 and len(data["ranks"]) == 2

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from latentforge.errors import UserError
from latentforge.io.model_folder import (
    DataInfo,
    ModelMeta,
    load_diffusion_model,
    load_model_folder,
    save_model_folder,
)
from latentforge.pipelines.generate import generate
from latentforge.training import TrainConfig, train_diffusion
from latentforge.training.diffusion import DiffusionTrainer as Trainer


def _cfg(out, **kw):
    base = dict(
        data="digits",
        out=str(out),
        preset="tiny",
        cond="class",
        max_steps=4,
        batch_size=8,
        warmup_steps=2,
        sample_every=0,
        ckpt_every=2,
        quiet=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_model_folder_round_trip(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    meta = ModelMeta(kind="vae", vae={"in_channels": 3}, data=DataInfo(resolution=8, channels=3))
    save_model_folder(tmp_path, meta, state)
    back_meta, back = load_model_folder(tmp_path)
    assert back_meta == meta
    assert all(torch.equal(state[k], back[k]) for k in state)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_train_writes_a_loadable_model(tmp_path):
    assert train_diffusion(_cfg(tmp_path)) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["training"]["step"] == 4 and meta["data"]["class_names"][7] == "7"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000004",
    ]
    model = load_diffusion_model(tmp_path)
    images = generate(model, labels=[7], num=2, steps=3)
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1


def test_resume_is_exact(tmp_path):
    """N steps, stop, resume to 2N == 2N uninterrupted (weights, EMA and optimizer)."""
    straight, split = tmp_path / "a", tmp_path / "b"
    train_diffusion(_cfg(straight, max_steps=6, ckpt_every=3))
    train_diffusion(_cfg(split, max_steps=3, ckpt_every=3))
    assert train_diffusion(_cfg(split, max_steps=6, ckpt_every=3), resume=True) == 0
    for name in ("model", "ema", "optimizer"):
        a = load_file(straight / "checkpoints/step-0000006" / f"{name}.safetensors")
        b = load_file(split / "checkpoints/step-0000006" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_refuses_to_overwrite_and_checks_resume_config(tmp_path):
    train_diffusion(_cfg(tmp_path, max_steps=2))
    with pytest.raises(UserError, match="--resume"):
        train_diffusion(_cfg(tmp_path, max_steps=2))
    with pytest.raises(UserError, match="cannot resume"):
        train_diffusion(_cfg(tmp_path, max_steps=4, preset="small"), resume=True)


def test_resume_reads_a_setting_newer_than_the_checkpoint_as_its_default(tmp_path):
    """A checkpoint written before a resume-checked setting existed resumes when the setting is
    at its default, and is refused otherwise."""
    import json

    train_diffusion(_cfg(tmp_path, max_steps=2, ckpt_every=2))
    state = next((tmp_path / "checkpoints").glob("step-*")) / "state.json"
    data = json.loads(state.read_text())
    del data["config"]["text_phrases"]
    state.write_text(json.dumps(data))
    with pytest.raises(UserError, match="text-phrases"):
        train_diffusion(_cfg(tmp_path, max_steps=3, text_phrases=2), resume=True)
    assert train_diffusion(_cfg(tmp_path, max_steps=3), resume=True) == 0


def test_grad_accumulation_and_batch_sharding(tmp_path):
    trainer = Trainer(_cfg(tmp_path, grad_accum=2))
    seen = torch.cat([trainer._indices(s, m) for s in range(3) for m in range(2)])
    assert len(seen.unique()) == len(seen)  # no repeats inside an epoch
    trainer.rank, trainer.world = 1, 2
    other = trainer._indices(0, 0)
    trainer.rank = 0
    assert not set(other.tolist()) & set(trainer._indices(0, 0).tolist())


def test_oversample_weights_and_draws(tmp_path):
    """--oversample 'small star=4': images holding a small star weigh 4 (and only they), the
    draws are a pure function of (seed, step, micro, rank), and they follow the weights."""
    from latentforge.data import load_dataset
    from latentforge.shapes.dataset import sample_weights

    ds = load_dataset("shapes:16:400", seed=0)
    weights = sample_weights(ds, ["small star=4", "large red=0.5", "circle on gray=3"])
    gray_circles = 0
    for i in range(len(ds)):
        record = ds.record(i)
        objects = record["objects"]
        expect = 4.0 if any(o["size"] == "small" and o["shape"] == "star" for o in objects) else 1
        if any(o["size"] == "large" and o["colour"] == "red" for o in objects):
            expect *= 0.5
        if record["background"] == "gray" and any(o["shape"] == "circle" for o in objects):
            expect *= 3
            gray_circles += 1
        assert weights[i] == expect
    assert gray_circles >= 5  # the background rule was tested on some images
    with pytest.warns(UserWarning, match="matches no image"):  # red stars are held out
        held_out = sample_weights(load_dataset("shapes:16:400:holdout", seed=0), ["red star=5"])
    assert torch.all(held_out == 1)
    star = weights >= 2
    assert 0.05 < star.double().mean() < 0.4

    cfg = _cfg(tmp_path, data="shapes:16:400", cond="none", oversample=("small star=4",))
    trainer = Trainer(cfg)
    draws = torch.cat([trainer._indices(s, 0) for s in range(200)])
    assert torch.equal(trainer._indices(7, 0), trainer._indices(7, 0))
    assert not torch.equal(trainer._indices(7, 0), trainer._indices(7, 1))
    # expected share of small-star images among draws: 4p / (4p + 1 - p)
    p = star.double().mean().item()
    share = star[draws].double().mean().item()
    assert abs(share - 4 * p / (3 * p + 1)) < 0.05, (share, p)


def test_train_vae_takes_oversample(tmp_path):
    """train vae draws by the same weights and records the rules in model.json."""
    from latentforge.shapes.dataset import sample_weights
    from latentforge.training.vae_train import VAETrainConfig, VAETrainer, train_vae

    cfg = VAETrainConfig(data="shapes:16:200", out=str(tmp_path), max_steps=1, batch_size=2,
                         sample_every=0, eval_images=4, quiet=True,
                         oversample=("small star=4",))  # fmt: skip
    trainer = VAETrainer(cfg)
    assert torch.equal(trainer._weights, sample_weights(trainer.dataset, ["small star=4"]))
    assert train_vae(cfg) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["training"]["config"]["oversample"] == ["small star=4"]


def test_oversample_errors(tmp_path):
    from latentforge.shapes.dataset import parse_oversample

    assert parse_oversample(["Small STAR=2.5"]) == [({"size": "small", "shape": "star"}, 2.5)]
    assert parse_oversample(["blue star on a gray background=2", "on red=3"]) == [
        ({"background": "gray", "colour": "blue", "shape": "star"}, 2.0),
        ({"background": "red"}, 3.0),
    ]
    for bad in ["star", "tiny star=2", "star=0", "star=-1", "star=x", "small large=2", "=3",
                "star on pink=2", "star on=2", "star on gray on red=2", "gray=2"]:  # fmt: skip
        with pytest.raises(UserError, match="--oversample"):
            parse_oversample([bad])
    with pytest.raises(UserError, match="--oversample needs data whose images list their objects"):
        Trainer(_cfg(tmp_path, oversample=("star=2",)))


def test_object_weight_boxes_and_loss(tmp_path):
    """--object-weight 'small star=4': the cells of a small star's box (one cell wider) weigh 4,
    every other cell 1; the trainer passes them to the loss, whose per-pixel weights of one
    change nothing and whose weighted error grows only through the weighted cells."""
    from latentforge.data import load_dataset
    from latentforge.denoisers import _weighted_mean
    from latentforge.shapes.dataset import object_rules, object_weights

    ds = load_dataset("shapes:64:300", seed=0)

    def holds_small_star(i: int) -> bool:
        return any(o["size"] == "small" and o["shape"] == "star" for o in ds.record(i)["objects"])

    star = [i for i in range(len(ds)) if holds_small_star(i)]
    plain = next(i for i in range(len(ds)) if i not in star)
    rules = object_rules(ds, ["small star=4"], "--object-weight")
    w = object_weights(ds, rules, torch.tensor([star[0], plain]), 16)
    assert w.shape == (2, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 4.0}
    assert torch.all(w[1] == 1)
    (o,) = [o for o in ds.record(star[0])["objects"] if o["shape"] == "star"]
    rows, cols = (w[0, 0] == 4).nonzero().unbind(1)
    # every weighted cell's centre is within radius + one cell of the star's centre, per axis
    for idx, c in ((rows, o["cy"]), (cols, o["cx"])):
        assert ((idx + 0.5) * 4 - c).abs().max() <= o["radius"] + 4
    assert (w[0] == 4).sum() >= 4  # a small star covers a few cells at least
    err = torch.randn(2, 4, 16, 16)
    assert torch.equal(_weighted_mean(err, torch.ones(2, 1, 16, 16)), _weighted_mean(err, None))
    heavier = _weighted_mean(err, w)
    assert heavier[0] > _weighted_mean(err, None)[0] and heavier[1] == _weighted_mean(err, None)[1]

    cfg = _cfg(tmp_path, data="shapes:16:64", cond="none", object_weight=("small star=4",),
               max_steps=2)  # fmt: skip
    assert train_diffusion(cfg) == 0
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["training"]["config"]["object_weight"] == ["small star=4"]
    with pytest.raises(UserError, match="--object-weight"):
        Trainer(_cfg(tmp_path / "b", object_weight=("star=2",)))  # digits: no objects
    with pytest.raises(UserError, match="--object-weight"):
        Trainer(_cfg(tmp_path / "c", data="shapes:16:64", cond="none",
                     object_weight=("tiny star=2",)))  # fmt: skip


def test_region_captions_are_the_planners_region_prompts(tmp_path):
    """--region-captions: a picked two-object image is captioned as the layout planner writes
    the prompt of that object's box (read from the image's own caption), the other object's box
    (one cell wider) weighs 0 in the loss and the picked one 1; images not picked, and
    one-object images, keep their caption and weigh 1 everywhere."""
    from latentforge.data import load_dataset
    from latentforge.shapes.dataset import region_captions
    from latentforge.shapes.layout import shapes_layout

    ds = load_dataset("shapes:64:300", seed=0)
    two = [i for i in range(len(ds)) if len(ds.record(i)["objects"]) == 2][:3]
    one = next(i for i in range(len(ds)) if len(ds.record(i)["objects"]) == 1)
    indices = torch.tensor([two[0], two[1], two[2], one])
    captions, w = region_captions(ds, indices, torch.tensor([0, 1, -1, 0]), 16)
    assert w.shape == (4, 1, 16, 16) and captions[2:] == [None, None]
    assert torch.all(w[2:] == 1)
    for b, k in ((0, 0), (1, 1)):
        record = ds.record(int(indices[b]))
        regions = shapes_layout(record["caption"])
        assert captions[b] == regions[k].prompt  # what regional prompting asks of this box
        other, kept = record["objects"][1 - k], record["objects"][k]
        zero = (w[b, 0] == 0).nonzero()
        assert len(zero) >= 4 and set(w[b].unique().tolist()) == {0.0, 1.0}
        for idx, c in ((zero[:, 0], other["cy"]), (zero[:, 1], other["cx"])):
            assert ((idx + 0.5) * 4 - c).abs().max() <= other["radius"] + 4
        assert w[b, 0, int(kept["cy"] // 4), int(kept["cx"] // 4)] == 1
    with pytest.raises(UserError, match="--region-captions"):
        Trainer(_cfg(tmp_path / "a", data="shapes:16:64", cond="none", region_captions=0.5))
    with pytest.raises(UserError, match="--region-captions"):
        Trainer(_cfg(tmp_path / "b", region_captions=0.5))  # digits


def test_class_cond_errors(tmp_path):
    with pytest.raises(UserError, match="unknown data spec"):
        Trainer(_cfg(tmp_path, data="cifar"))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on linux")
def test_torchrun_two_processes(tmp_path):
    """The same loop under torchrun --nproc_per_node 2 (gloo, DDP) trains and writes once."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29517", "-m", "latentforge.cli",
        "train", "diffusion", "--data", "digits", "--out", str(tmp_path), "--cond", "class",
        "--max-steps", "3", "--batch-size", "4", "--ckpt-every", "3", "--sample-every", "0",
        "--quiet",
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["step"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000003"]


_DDP_SYNC = """
import sys

import torch
import torch.distributed as dist

from latentforge.training import TrainConfig
from latentforge.training.tasks import InpaintTrainer

cfg = TrainConfig(data="digits", out=sys.argv[1], cond="class", task="inpaint", max_steps=2,
                  grad_accum=2, batch_size=4, lr=1e-2, sample_every=0, ckpt_every=2, quiet=True)
trainer = InpaintTrainer(cfg)
assert trainer.denoiser.model is trainer.ddp
start = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
assert trainer.fit() == 0
weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
rank0 = weights.clone()
dist.broadcast(rank0, 0)
assert not torch.equal(weights, start)
assert torch.equal(weights, rank0), "the ranks' weights differ: gradients were not all-reduced"
dist.destroy_process_group()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on linux")
def test_ddp_ranks_train_the_same_weights(tmp_path):
    """Under DDP the loss runs the network through the wrapper (the trainer's denoiser is built
    around trainer.ddp), so each rank's gradients on its own shard are all-reduced and the two
    ranks end with the same weights; a forward through the bare model would leave them apart.
    A task trainer, for its task inputs, and grad_accum 2, for DDP's no_sync micro-batch."""
    script = tmp_path / "ddp_sync.py"
    script.write_text(_DDP_SYNC)
    env = dict(os.environ, OMP_NUM_THREADS="1", LATENTFORGE_DEVICE="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29518", str(script), str(tmp_path / "run")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]


def test_training_modules_import_without_a_circle():
    """The modules of latentforge/training import one another in one direction only, the
    generic loop importing no trainer, counting every import: relative or absolute, at module
    level or inside a function. And none imports a dataset's wing (latentforge.shapes plugs
    itself in through data.register_data_kind) or a front end (server, commands, cli)."""
    import ast
    from graphlib import CycleError, TopologicalSorter
    from pathlib import Path

    import latentforge.training

    package = "latentforge.training"
    parts = package.split(".")
    files = {p.stem: p for p in Path(latentforge.training.__file__).parent.glob("*.py")}
    forbidden = ("latentforge.shapes", "latentforge.server", "latentforge.commands",
                 "latentforge.cli")  # fmt: skip
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported: list[str] = []  # the dotted names each import statement asks for
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # every file here (and __init__) sits in the package itself
                    up = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    imported.append(f"{base}.{alias.name}")  # `from .. import shapes` too
                    if not (base == package and alias.name in files):
                        imported.append(base)  # a name defined in base: base runs
        for target in imported:
            bad = [f for f in forbidden if target == f or target.startswith(f + ".")]
            assert not bad, f"training/{path.name} imports {target}"
        edges = {"__init__" for t in imported if t == package}
        edges |= {t.split(".")[len(parts)] for t in imported if t.startswith(package + ".")}
        graph[name] = (edges & set(files)) - {name}
    assert {"diffusion", "loop"} <= graph["tasks"]  # the parser sees the edges there are
    # the loop imports no trainer: only its own helpers (streams, FSDP), which import none
    helpers = {"stream", "sharded"}
    assert graph["loop"] <= helpers, f"loop.py imports {graph['loop'] - helpers}"
    assert not set().union(*(graph.get(h, set()) for h in helpers)), "a loop helper imports"
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        raise AssertionError(f"import circle in latentforge/training: {e.args[1]}") from None


def test_import_latentforge_leaves_the_trainers_unimported():
    """`import latentforge` imports no trainer (the shapes wing registers its data kind in
    `latentforge.data`, below training); `latentforge.training` exports the entry points."""
    code = (
        "import sys, latentforge\n"
        "print(sorted(m for m in sys.modules if m.startswith('latentforge.training')))\n"
        "import latentforge.training as t\n"
        "print(t.TrainConfig.__module__, t.train_diffusion.__module__, t.train_vae.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "[]",
        "latentforge.training.diffusion latentforge.training.tasks latentforge.training.vae_train",
    ]


def test_the_loss_gets_the_task_inputs_and_runs_through_ddp(tmp_path):
    """DiffusionTrainer.compute_loss hands task_cond's inputs (here the inpainting mask and
    masked image) to the denoiser's loss with the class labels, through trainer.ddp (the model
    itself in one process), and leaves the denoiser as it was built."""
    from latentforge.training.tasks import InpaintTrainer

    trainer = InpaintTrainer(_cfg(tmp_path, task="inpaint"))
    assert trainer.denoiser.model is trainer.ddp is trainer.model
    seen = []
    trainer.ddp.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True
    )
    before = dict(vars(trainer.denoiser))
    trainer.train_step()
    assert seen == [["class_labels", "concat"]]
    assert vars(trainer.denoiser) == before  # nothing bound to it or swapped in for a call


def test_parallel_render_matches_in_process():
    """Worker-process rendering (used to cache big datasets on GPU machines) is bit-exact."""
    from latentforge.data import load_dataset
    from latentforge.training.loop import render_dataset

    ds = load_dataset("shapes:16:40:holdout")
    serial, parallel = render_dataset(ds), render_dataset(ds, workers=2)
    assert torch.equal(serial["image"], parallel["image"])
    assert serial["caption"] == parallel["caption"] and len(serial["caption"]) == 40


def test_training_device(monkeypatch):
    from latentforge.training.loop import step_generator, training_device

    monkeypatch.setenv("LATENTFORGE_DEVICE", "cpu")
    assert training_device() == torch.device("cpu")
    assert step_generator(0, 3).device == torch.device("cpu")
    monkeypatch.setenv("LATENTFORGE_DEVICE", "tpu9")
    with pytest.raises(UserError, match="LATENTFORGE_DEVICE"):
        training_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("LATENTFORGE_DEVICE", "cuda")
        with pytest.raises(UserError, match="CUDA is not available"):
            training_device()


def test_sigterm_saves_and_exits_130(tmp_path):
    """A time budget (`timeout -s TERM`) ends training cleanly: checkpoint, model, status 130."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "LATENTFORGE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "latentforge.cli", "train", "diffusion", "--data", "digits",
           "--cond", "class", "--max-steps", "100000", "--batch-size", "4", "--sample-every",
           "0", "--ckpt-every", "100000", "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # fit() makes out/ just before it installs its handlers
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["step"] >= 1


def test_lr_schedules():
    """Linear warm-up, then constant or a half cosine that reaches 0 at max_steps."""
    import itertools
    from types import SimpleNamespace

    from latentforge.training import loop

    def lr(schedule, step):
        cfg = TrainConfig(data="digits", out="x", lr=1.0, warmup_steps=10, max_steps=110,
                          lr_schedule=schedule)  # fmt: skip
        return loop.Trainer.lr_at(SimpleNamespace(cfg=cfg), step)

    assert [lr("constant", s) for s in (0, 4, 9, 50, 109)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert lr("cosine", 4) == 0.5 and lr("cosine", 10) == 1.0
    assert lr("cosine", 60) == pytest.approx(0.5) and lr("cosine", 110) == pytest.approx(0.0)
    cos = [lr("cosine", s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(cos))

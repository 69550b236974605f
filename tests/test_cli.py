import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from latentforge.cli import main
from latentforge.io.images import read_png_metadata
from latentforge.io.model_folder import default_model_dir


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("latentforge: error:") and "\n" not in err, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["train", "diffusion", "--help"],
        ["sample", "--help"],
        ["generate", "--help"],
        ["bench", "--help"],
        ["bench", "samplers", "--help"],
        ["eval", "fid", "--help"],
        ["report", "trilemma", "--help"],
        ["features", "train-shapes", "--help"],
    ],
)
def test_help_everywhere(argv, capsys):
    assert main(argv) == 0
    assert "Usage" in capsys.readouterr().out


def test_every_command_is_on_the_root_group():
    from latentforge.cli import cli

    assert set(cli.commands) == {
        "train", "sample", "generate", "img2img", "inpaint", "interpolate", "upscale", "eval",
        "report", "features", "bench", "serve", "import", "export", "data", "distill", "lora",
    }  # fmt: skip


def test_no_command_module_imports_the_cli():
    """cli.py imports latentforge.commands, never the other way round (no import circle):
    read every module's imports, absolute and relative, at any depth in the file."""
    import ast
    from pathlib import Path

    import latentforge.commands

    root = Path(latentforge.commands.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert {"options.py", "common.py", "bench.py"} <= {f.name for f in files}
    for path in files:
        package = "latentforge." + ".".join(path.relative_to(root.parent).with_suffix("").parts)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                assert not (target == "latentforge.cli" or target.startswith("latentforge.cli.")), (
                    f"{path.name}:{node.lineno} imports {target}"
                )


def test_sample_writes_a_grid(tiny_digits_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sample", "--model", str(tiny_digits_model), "--label", "7", "--num", "4"]
    assert main([*argv, "--steps", "2", "--sampler", "ddim", "--seed", "3", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 + 2 * 18, 2 + 2 * 18)
    assert read_png_metadata(out)["seed"] == "3"


def test_generate_with_a_model_folder(tiny_digits_model, tmp_path):
    out = tmp_path / "seven.png"
    assert main(["generate", "a seven", "--model", str(tiny_digits_model), "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert read_png_metadata(out)["prompt"] == "a seven"


def test_sampler_knobs_via_opt_change_the_image_and_round_trip(tiny_digits_model, tmp_path):
    m, base = str(tiny_digits_model), ["--sampler", "ddim", "--steps", "3", "--seed", "1"]
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    assert main(["generate", "7", "--model", m, *base, "--opt", "eta=1", "--out", str(a)]) == 0
    assert main(["generate", "7", "--model", m, *base, "--out", str(b)]) == 0
    assert read_png_metadata(a)["options"] == '{"eta": 1}'
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.tobytes() != ib.tobytes()  # eta = 1 draws fresh noise at every step
    assert main(["generate", "--from-png", str(a), "--model", m, "--out", str(c)]) == 0
    with Image.open(a) as ia, Image.open(c) as ic:
        assert ia.tobytes() == ic.tobytes()


def test_user_errors_exit_2_with_one_line(tiny_digits_model, tmp_path, capsys):
    m = str(tiny_digits_model)
    out = str(tmp_path / "x.png")
    _one_line_error(capsys, ["train", "diffusion", "--data", "cifar", "--out", out], "cifar")
    _one_line_error(
        capsys, ["train", "diffusion", "--data", f"folder:{tmp_path}/nope", "--out", out], "nope"
    )
    _one_line_error(capsys, ["train", "diffusion", "--data", "digits"], "--out")
    _one_line_error(capsys, ["train", "diffusion", "--data", "digits", "--out", out,
                             "--max-steps", "-3"], "max-steps")  # fmt: skip
    _one_line_error(capsys, ["sample", "--model", str(tmp_path / "missing"), "--out", out],
                    "not found")  # fmt: skip
    _one_line_error(capsys, ["sample", "--model", m, "--sampler", "magic", "--out", out],
                    "unknown sampler")  # fmt: skip
    _one_line_error(capsys, ["sample", "--model", m, "--steps", "-5", "--out", out], "steps")
    _one_line_error(capsys, ["sample", "--model", m, "--label", "cat", "--out", out], "label")
    _one_line_error(capsys, ["generate", "x", "--model", m, "--num", "0", "--out", out], "num")
    _one_line_error(capsys, ["sample", "--model", m, "--opt", "eta", "--out", out], "KEY=VALUE")
    _one_line_error(capsys, ["sample", "--model", m, "--sampler", "euler", "--opt", "eta=0.5",
                             "--out", out], "no option", "s_churn")  # fmt: skip
    _one_line_error(capsys, ["generate", "x", "--model", m, "--region", "a seven", "0", "0",
                             "1", "1", "--out", out], "text-conditioned")  # fmt: skip
    _one_line_error(capsys, ["generate", "x", "--model", m, "--region", "a seven", "0.5", "0",
                             "0.2", "1", "--out", out], "X0 Y0 X1 Y1")  # fmt: skip
    _one_line_error(capsys, ["frobnicate"], "frobnicate")


def test_pickle_and_corrupt_checkpoints_are_refused(tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "model.ckpt").write_bytes(b"\x80\x04junk")
    _one_line_error(capsys, ["sample", "--model", str(pickled), "--out", "x.png"], "pickle")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.json").write_text('{"kind": "diffusion"}')  # model.json is read first
    _one_line_error(capsys, ["sample", "--model", str(corrupt), "--out", "x.png"], "'unet'")
    shutil.copy(default_model_dir() / "model.json", corrupt / "model.json")
    _one_line_error(capsys, ["sample", "--model", str(corrupt), "--out", "x.png"], "vae")
    shutil.copytree(default_model_dir() / "vae", corrupt / "vae")  # checked before the weights
    (corrupt / "model.safetensors").write_bytes(b"not safetensors at all")
    _one_line_error(capsys, ["sample", "--model", str(corrupt), "--out", "x.png"], "safetensors")


def meta_interval(model_dir) -> list:
    """The guidance interval a model folder's generate uses, as PNGs store it."""
    import json

    default = json.loads((model_dir / "model.json").read_text())["sampling"]
    return default.get("guidance_interval") or [0.0, None]


def meta_default(model_dir) -> str:
    import json

    return json.loads((model_dir / "model.json").read_text())["sampling"].get("layout", "none")


def test_the_embedded_default_model_generates_and_round_trips(tmp_path):
    """No --model: the shipped shapes text-to-image model. 64x64 RGB, the same image for the
    same seed, another for another seed, and --from-png reproduces it bit-exactly."""
    import json

    meta = json.loads((default_model_dir() / "model.json").read_text())
    assert meta["cond"] == "text" and meta["latent"]["image_resolution"] == 64
    assert (default_model_dir() / "vae" / "model.safetensors").is_file()
    prompt = "a large yellow star in the center on a blue background"
    a, b, c, d = (tmp_path / f"{n}.png" for n in "abcd")
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        assert (
            main(["generate", prompt, "--steps", "3", "--seed", str(seed), "--out", str(out)]) == 0
        )
    assert main(["generate", "--from-png", str(a), "--out", str(d)]) == 0
    with Image.open(a) as ia, Image.open(b) as ib, Image.open(c) as ic, Image.open(d) as id_:
        assert ia.size == (64, 64) and ia.mode == "RGB"  # one image: no grid frame
        assert ia.tobytes() == ib.tobytes() == id_.tobytes()
        assert ia.tobytes() != ic.tobytes()
    meta = read_png_metadata(a)
    assert meta["prompt"] == prompt and meta["steps"] == "3" and meta["guidance"] == "3.0"
    # the interval actually used is stored resolved and reproduced by --from-png
    assert json.loads(meta["guidance_interval"]) == meta_interval(default_model_dir())
    e, f = tmp_path / "e.png", tmp_path / "f.png"
    args = ["generate", prompt, "--steps", "3", "--out", str(e), "--guidance-interval", "0", "inf"]
    assert main(args) == 0
    assert json.loads(read_png_metadata(e)["guidance_interval"]) == [0.0, None]
    assert main(["generate", "--from-png", str(e), "--out", str(f)]) == 0
    with Image.open(e) as ie, Image.open(f) as if_:
        assert ie.tobytes() == if_.tobytes()
    # two objects: the model's default layout splits the prompt into regions; stored, and
    # reproduced; --layout none is another image
    two = "a small red circle above a blue square on a white background"
    g, h, i = (tmp_path / f"{n}.png" for n in "ghi")
    assert main(["generate", two, "--steps", "3", "--out", str(g)]) == 0
    assert read_png_metadata(g)["layout"] == "shapes" == meta_default(default_model_dir())
    assert main(["generate", "--from-png", str(g), "--out", str(h)]) == 0
    assert main(["generate", two, "--steps", "3", "--layout", "none", "--out", str(i)]) == 0
    with Image.open(g) as ig, Image.open(h) as ih, Image.open(i) as ii:
        assert ig.tobytes() == ih.tobytes() != ii.tobytes()


# ----- progress bars ---------------------------------------------------------------------------
def bar_count(err: str) -> tuple[int, int] | None:
    """(steps counted, total) of the last progress bar state on stderr, None without a bar: a
    bar closes showing how many callbacks it saw out of the total it was given."""
    states = re.findall(r"(\d+)/(\d+) \[", err)
    return tuple(map(int, states[-1])) if states else None


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 2), ("heun", 3), ("dpmpp_2m", 3)])
def test_generate_and_sample_show_one_bar_step_per_sampler_step(
    tiny_digits_model, tmp_path, capsys, sampler, steps
):
    """heun's and dpm2's second denoiser calls are not steps: one callback per step, whatever
    the sampler, so the bar ends at steps/steps."""
    m, out = ["--model", str(tiny_digits_model)], str(tmp_path / "x.png")
    run = ["--sampler", sampler, "--steps", str(steps), "--out", out]
    assert main(["generate", "7", *m, *run]) == 0
    assert bar_count(capsys.readouterr().err) == (steps, steps)
    assert main(["sample", *m, "--label", "7", "--num", "2", *run]) == 0
    err = capsys.readouterr().err
    assert bar_count(err) == (steps, steps) and "sampling: 100%" in err, err
    for cmd in (["generate", "7"], ["sample"]):
        assert main([*cmd, *m, *run, "--quiet"]) == 0
        assert capsys.readouterr().err == ""


def test_the_bar_total_is_the_model_default_without_steps(tiny_digits_model, tmp_path, capsys):
    import json

    default = json.loads((tiny_digits_model / "model.json").read_text())["sampling"]["steps"]
    m, out = ["--model", str(tiny_digits_model)], str(tmp_path / "x.png")
    assert main(["generate", "7", *m, "--out", out]) == 0
    assert bar_count(capsys.readouterr().err) == (default, default)
    assert main(["img2img", out, *m, "--strength", "0.5", "--out", out]) == 0
    assert bar_count(capsys.readouterr().err) == (round(default / 2),) * 2


def test_generate_bar_with_preview_and_from_png(tiny_digits_model, tmp_path, capsys):
    """The preview GIF and the bar share the step callback; --from-png counts the PNG's steps."""
    m, out, gif = ["--model", str(tiny_digits_model)], tmp_path / "a.png", tmp_path / "a.gif"
    assert (
        main(["generate", "7", *m, "--steps", "3", "--out", str(out), "--preview", str(gif)]) == 0
    )
    assert bar_count(capsys.readouterr().err) == (3, 3)
    with Image.open(gif) as im:
        assert im.n_frames == 3 + 1  # one frame per step, then the result
    assert main(["generate", "--from-png", str(out), *m, "--out", str(tmp_path / "b.png")]) == 0
    assert bar_count(capsys.readouterr().err) == (3, 3)


def test_the_bar_closes_on_errors_and_quiet_reports_nothing():
    from tqdm import tqdm

    from latentforge.commands.common import progress

    with pytest.raises(RuntimeError), progress(5, "test") as callback:
        callback(0, None, None, None)
        assert len(tqdm._instances) == 1
        raise RuntimeError("mid-sampling")
    assert not tqdm._instances
    with progress(5, "test", quiet=True) as callback:
        assert callback is None  # the pipelines skip the per-step call altogether


@pytest.mark.parametrize("opt", ["s_noise=1e308", "eta=nan", "s_noise=inf"])
def test_non_finite_knobs_exit_2_from_outside(tiny_digits_model, tmp_path, opt):
    """From a real process: exit 2, one line naming the knob, no image written."""
    out = tmp_path / "x.png"
    argv = ["generate", "7", "--model", str(tiny_digits_model), "--sampler", "euler_ancestral",
            "--steps", "2", "--opt", opt, "--out", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "latentforge", *argv], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    err = r.stderr.strip()
    assert r.returncode == 2, err
    assert err.startswith("latentforge: error:") and "\n" not in err, err
    assert opt.split("=")[0] in err and not out.exists()


def test_a_decoder_that_overflows_fails_instead_of_writing_black(tmp_path, monkeypatch, capsys):
    """NaN from the decoder (fp16 overflow in SD's VAE) is an error, not a black PNG."""
    from latentforge.io.model_folder import LoadedModel

    monkeypatch.setattr(LoadedModel, "decode", lambda self, x, **kw: x.new_full(
        (x.shape[0], 3, 8, 8), float("nan")))  # fmt: skip
    out = tmp_path / "x.png"
    argv = ["generate", "a red circle", "--steps", "2", "--quiet", "--out", str(out)]
    _one_line_error(capsys, argv, "decoder produced NaN/Inf")
    assert not out.exists()


def test_vae_tiling_option_reaches_the_png(tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["generate", "a red circle", "--steps", "1", "--vae-tiling", "on", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    assert read_png_metadata(out)["vae_tiling"] == "on"
    _one_line_error(capsys, ["generate", "x", "--vae-tiling", "maybe"], "--vae-tiling")

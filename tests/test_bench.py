import json

import pytest

from latentforge.cli import main

BENCHMARKS = {"samplers": "samplers", "latent-vs-pixel": "latent_pixel", "unet": "unet",
              "generate": "generate", "sd": "sd", "lora": "lora"}  # fmt: skip


def test_bench_samplers_help_shows_its_options(capsys):
    """`bench NAME --help` is the benchmark's own help (click used to eat it)."""
    assert main(["bench", "samplers", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: latentforge bench samplers [OPTIONS]" in out
    for option in ("--draws", "--nfe", "--no-diffusers", "--no-unseen", "--fit", "--plot"):
        assert option in out


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_bench_subcommand_has_help(name, capsys):
    """Each benchmark is a click subcommand: --help and -h print its options and exit 0, from
    `latentforge bench NAME` and from its script's main(argv) alike."""
    import importlib

    for flag in ("--help", "-h"):
        assert main(["bench", name, flag]) == 0
        out = capsys.readouterr().out
        assert f"Usage: latentforge bench {name} [OPTIONS]" in out and "--json" in out
    module = importlib.import_module(f"latentforge.benchmarks.{BENCHMARKS[name]}")
    assert module.main(["--help"]) == 0
    assert f"Usage: latentforge bench {name} [OPTIONS]" in capsys.readouterr().out


def test_bench_lists_the_benchmarks_and_rejects_bad_options(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS)
    for argv in (["bench", "nope"], ["bench", "samplers", "--nfe", "1"],
                 ["bench", "samplers", "--nfe", "5,x"], ["bench", "unet", "--bogus"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("latentforge: error:") and err.count("\n") == 1, err
    from latentforge.benchmarks.samplers import main as script_main

    assert script_main(["--draws", "0"]) == 2  # bench/samplers.py: click's usage error
    assert "--draws" in capsys.readouterr().err


def test_latent_vs_pixel_bench_json(capsys):
    argv = ["bench", "latent-vs-pixel", "--data", "shapes:32", "--batch-size", "2",
            "--repeats", "1", "--nfe", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("train_speedup", "sample_speedup", "quality_metric", "quality_pixel",
                "quality_latent", "vae_psnr_db"):  # fmt: skip
        assert key in out
    assert out["latent_shape"] == [4, 8, 8] and out["train_speedup"] > 0


def test_samplers_bench_json_records(capsys):
    """A tiny run of `bench samplers --json`: the records have the documented shape, every
    error is finite, and exact solutions make the highest-order runs accurate at NFE 20."""
    argv = ["bench", "samplers", "--json", "--draws", "32", "--nfe", "5,20", "--no-unseen",
            "--repeats", "1"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    keys = {"impl", "sampler", "schedule", "nfe", "rms_error", "median_error", "flips"}
    assert all(keys | {"overhead_us"} <= set(r) for r in rows)
    assert {r["impl"] for r in rows} == {"latentforge", "diffusers"}
    assert all(0 <= r["median_error"] < 10 and 0 <= r["rms_error"] < 10 for r in rows)
    assert all(0 <= r["flips"] <= 32 and r["overhead_us"] > 0 for r in rows)
    lf20 = [r for r in rows if r["impl"] == "latentforge" and r["nfe"] == 20]
    assert min(r["rms_error"] for r in lf20) < 5e-3
    assert all(r["nfe_used"] <= r["nfe"] for r in rows)


def test_latent_vs_pixel_bench_quality_with_trained_models(tmp_path, capsys):
    """With model folders the bench scores both on held-out images and reads the VAE from the
    latent model's folder; quality_ratio is latent / pixel."""
    from latentforge.training import TrainConfig, train_diffusion
    from latentforge.training.vae_train import VAETrainConfig, train_vae

    common = dict(data="shapes:16", max_steps=1, batch_size=2, sample_every=0, quiet=True)
    train_vae(VAETrainConfig(out=str(tmp_path / "vae"), eval_images=4, **common))
    train_diffusion(TrainConfig(out=str(tmp_path / "pixel"), **common))
    train_diffusion(TrainConfig(out=str(tmp_path / "latent"), vae=str(tmp_path / "vae"), **common))
    argv = ["bench", "latent-vs-pixel", "--data", "shapes:16", "--batch-size", "2", "--repeats",
            "1", "--nfe", "1", "--quality-n", "24", "--pixel-model", str(tmp_path / "pixel"),
            "--latent-model", str(tmp_path / "latent"), "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quality_pixel"] > 0 and out["quality_latent"] > 0
    assert out["quality_ratio"] == round(out["quality_latent"] / out["quality_pixel"], 3)
    assert out["vae_psnr_db"] > 0 and 0 < out["vae_ssim"] <= 1
    assert out["latent_shape"] == [4, 4, 4]


def test_generate_bench_json(capsys):
    """A tiny run of `bench generate --json` on the embedded model: every timing is there and
    positive, bf16 images close to the fp32 ones on average."""
    argv = ["bench", "generate", "--batch", "2", "--steps", "2", "--repeats", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    settings = ("batch_one_object", "batch_two_objects_regions", "batch_two_objects_no_layout")
    for precision in ("fp32", "bf16"):
        assert out[f"{precision}_one_image_s"] > 0
        for key in settings:
            assert out[f"{precision}_{key}_images_per_s"] > 0
    assert all(out[f"bf16_speedup_{key}"] > 0 for key in settings)
    assert 0 < out["bf16_mean_abs_diff"] < 0.05 and out["bf16_max_abs_diff"] <= 2
    assert out["batch"] == 2 and out["steps"] == 2 and isinstance(out["cpu_bf16"], bool)


def test_sd_bench_help_lists_its_options(capsys):
    assert main(["bench", "sd", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: latentforge bench sd [OPTIONS]" in out
    for option in ("--preset", "--cache", "--device", "--dtype", "--size", "--steps", "--sampler",
                   "--repeats", "--warmup-steps", "--round-t", "--json"):  # fmt: skip
        assert option in out


@pytest.fixture(scope="module")
def sd_cache(tmp_path_factory):
    """One tiny random SD folder pair (diffusers' and the imported one) for every case."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return tmp_path_factory.mktemp("bench-sd")


SD_KEYS = (
    "device", "dtype", "size", "steps", "sampler", "latentforge_s_per_image",
    "diffusers_s_per_image", "time_ratio", "latentforge_its", "diffusers_its",
    "latentforge_peak_mem_bytes", "diffusers_peak_mem_bytes", "mem_ratio", "max_abs_diff",
    "threads", "cpu_bf16", "torch",
)  # fmt: skip


# 2 steps visit t = 999 and t = 0 only, all first-order steps; 6 steps also run DPM-Solver++'s
# second-order update on Karras levels between integer timesteps (where --round-t matters)
@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 2), ("dpmpp_2m", 2), ("dpmpp_2m", 6)])
def test_sd_bench_json_latentforge_equals_diffusers(sd_cache, sampler, steps, capsys):
    """`bench sd --preset tiny`: both libraries run the same pipeline from the same latents in
    their own processes; the JSON has the documented keys and the two images agree."""
    argv = ["bench", "sd", "--preset", "tiny", "--size", "64", "--steps", str(steps),
            "--repeats", "1", "--sampler", sampler, "--device", "cpu", "--cache", str(sd_cache),
            "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(key in out for key in SD_KEYS), sorted(set(SD_KEYS) - set(out))
    assert (out["device"], out["dtype"], out["size"], out["steps"], out["sampler"]) == (
        "cpu", "fp32", 64, steps, sampler,
    )  # fmt: skip
    assert out["time_ratio"] > 0 and out["mem_ratio"] > 0
    assert out["latentforge_its"] > 0 and out["diffusers_its"] > 0
    assert out["latentforge_peak_mem_bytes"] > 0 and out["diffusers_peak_mem_bytes"] > 0
    assert out["image_shape"] == [1, 3, 64, 64]
    assert isinstance(out["cpu_bf16"], bool) and out["threads"] >= 1
    assert out["max_abs_diff"] < 1e-3, out["max_abs_diff"]


def test_sd_bench_rejects_a_size_off_the_grid(capsys):
    argv = ["bench", "sd", "--preset", "sd15", "--size", "500", "--device", "cpu"]
    assert main(argv) == 2
    assert "multiple of 64" in capsys.readouterr().err

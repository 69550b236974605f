import json

from latentforge.cli import main


def test_latent_vs_pixel_bench_json(capsys):
    argv = ["bench", "latent-vs-pixel", "--data", "shapes:32", "--batch-size", "2",
            "--repeats", "1", "--nfe", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("train_speedup", "sample_speedup", "quality_metric", "quality_pixel",
                "quality_latent", "vae_psnr_db"):  # fmt: skip
        assert key in out
    assert out["latent_shape"] == [4, 8, 8] and out["train_speedup"] > 0

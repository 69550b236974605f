"""`latentforge bench unet`: the SD 1.5 U-Net in latentforge against diffusers, side by side.

Both networks get the same random weights (diffusers' is built on the meta device and given
latentforge's tensors). One forward at 64x64 latents, batch 2 (a CFG pair), 77 context tokens:
fp32, then bf16 (latentforge with bf16 weights; diffusers under bf16 autocast, its usual CPU
mode). A warm-up, then the median of N. Also the peak RSS of loading a converted SD-1.5-size
U-Net folder in a fresh process (lazy, tensor-by-tensor loading), divided by the file size; the
naive path (load the whole file, build a randomly initialised module, copy) for comparison.
`--preset sdxl` times SDXL's base U-Net instead (2.6B parameters, 2048-wide context, pooled
text embedding and size ids), `--latent N` sets the latent side (default 64); `peak_rss_bytes`
is this process's own high-water mark (both networks share one set of weights).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from ..io.checkpoint import MODEL_WEIGHTS
from ..io.lazy import as_lazy, build_module
from ..io.model_folder import DataInfo, ModelMeta, save_model_folder
from ..models.presets import unet_preset
from ..models.unet import UNet, count_parameters
from . import CONTEXT, one_line, script_main

# SD 1.x's noise schedule (the saved folder needs one; the benchmark times loading only)
SD_PARAMETERIZATION = {"type": "vp", "prediction": "eps", "beta_schedule": "scaled_linear"}

_CHILD = r"""
import json, resource, sys, time
import torch
from latentforge.io.diffusers_format import load_unet_module

def peak_rss():
    # VmHWM: this process's own high-water mark. ru_maxrss after fork/exec can report the
    # parent's RSS at spawn time (Linux keeps the old mm's high-water mark across exec).
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

mode, folder = sys.argv[1], sys.argv[2]
base = peak_rss()
t0 = time.perf_counter()
if mode == "naive":  # what a plain load does: whole file in memory + a random-init module
    from safetensors.torch import load_file
    from latentforge.io.checkpoint import load_state_strict
    from latentforge.io.model_folder import read_model_meta
    from latentforge.models.presets import UNetConfig
    from latentforge.models.unet import UNet
    unet = UNet(UNetConfig.from_dict(read_model_meta(folder).unet))
    load_state_strict(unet, load_file(f"{folder}/model.safetensors"), "U-Net")
else:
    dtype = torch.bfloat16 if mode == "lazy-bf16" else None
    unet = load_unet_module(folder, dtype=dtype)
seconds = time.perf_counter() - t0
n = sum(p.numel() for p in unet.parameters())
peak = peak_rss()
print(json.dumps({"peak": peak, "baseline": base, "seconds": seconds, "params": n}))
"""


def _random_unet(seed: int, preset: str = "sd15") -> UNet:
    """A preset's U-Net with small random weights, filled tensor by tensor (no slow default
    init)."""
    config = unet_preset(preset)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(config).state_dict().items()}
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    return build_module(lambda: UNet(config), state, "U-Net").eval()


def _diffusers_twin(unet: UNet):
    """The same network in diffusers, sharing latentforge's weight tensors."""
    from diffusers import UNet2DConditionModel

    from ..io.diffusers_config import unet_config_to_diffusers

    cfg = {k: v for k, v in unet_config_to_diffusers(unet.config, 64).items() if k[0] != "_"}
    with torch.device("meta"):
        twin = UNet2DConditionModel(**cfg)
    twin.load_state_dict(unet.state_dict(), strict=True, assign=True)
    return twin.eval()


def load_rss(folder: Path, mode: str) -> dict:
    """Peak RSS of loading `folder` in a fresh process ("lazy", "lazy-bf16" or "naive")."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"load child ({mode}) failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    *,
    repeats: int,
    quick: bool,
    skip_bf16: bool,
    skip_load: bool,
    tmp: str | None,
    preset: str = "sd15",
    latent: int = 64,
) -> dict:
    """The benchmark's record (the module docstring); `tmp` holds the temporary checkpoint."""
    torch.manual_seed(0)
    repeats = 1 if quick else repeats
    result: dict = {"preset": preset, "latent": latent, "threads": torch.get_num_threads(),
                    "repeats": repeats}  # fmt: skip
    unet = _random_unet(0, preset)
    result["parameters"] = count_parameters(unet)

    if not skip_load:
        if tmp:
            Path(tmp).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp) as tmp_dir:
            folder = Path(tmp_dir) / "sd15"
            meta = ModelMeta(
                kind="diffusion",
                unet=unet.config.to_dict(),
                parameterization=SD_PARAMETERIZATION,
                data=DataInfo(resolution=64, channels=4),
            )
            save_model_folder(folder, meta, unet.state_dict())
            size = (folder / MODEL_WEIGHTS).stat().st_size
            result["load_file_bytes"] = size
            for mode in ("lazy", "naive") if quick else ("lazy", "lazy-bf16", "naive"):
                r = load_rss(folder, mode)
                key = {"lazy": "", "lazy-bf16": "_bf16", "naive": "_naive"}[mode]
                result[f"load_peak_rss_ratio{key}"] = round(r["peak"] / size, 3)
                result[f"load_peak_rss_above_baseline_ratio{key}"] = round(
                    (r["peak"] - r["baseline"]) / size, 3
                )
                result[f"load_seconds{key}"] = round(r["seconds"], 2)

    twin = _diffusers_twin(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([500.0, 500.0])
    c = unet.config
    ctx = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    added: dict = {}  # SDXL: bigG's pooled embedding (1280) and 6 size / crop ids
    if c.addition_time_embed_dim:
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        size = float(latent * 8)
        added = {"text_embeds": torch.randn(2, pooled, generator=g),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2)}  # fmt: skip
    outs: dict = {}

    def timed(names_fns) -> list[float]:
        """Warm up each, then alternate them N times (drift in a shared CPU hits both alike)."""
        times: dict = {name: [] for name, _ in names_fns}
        with torch.inference_mode():
            for name, fn in names_fns:
                outs[name] = fn()
            for _ in range(repeats):
                for name, fn in names_fns:
                    t0 = time.perf_counter()
                    outs[name] = fn()
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            result[f"{name}_seconds"] = round(statistics.median(ts), 3)
        return [statistics.median(times[name]) for name, _ in names_fns]

    lf, df = timed([
        ("latentforge_fp32", lambda: unet(x, t, context=ctx, **added)),
        ("diffusers_fp32", lambda: twin(x, t, ctx, added_cond_kwargs=added or None).sample),
    ])  # fmt: skip
    result["fp32_ratio"] = round(lf / df, 3)
    ref = outs["diffusers_fp32"]
    result["fp32_max_abs_diff"] = float((outs["latentforge_fp32"] - ref).abs().max())
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not skip_bf16:
        state = as_lazy(unet.state_dict())
        unet16 = build_module(lambda: UNet(unet.config), state, "U-Net", dtype=torch.bfloat16)
        unet16.eval()
        x16, ctx16 = x.bfloat16(), ctx.bfloat16()

        def diffusers_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return twin(x, t, encoder_hidden_states=ctx).sample.float()

        lf, df = timed([
            ("latentforge_bf16", lambda: unet16(x16, t, context=ctx16).float()),
            ("diffusers_bf16", diffusers_bf16),
        ])  # fmt: skip
        result["bf16_ratio"] = round(lf / df, 3)
        a, b = outs["latentforge_bf16"], outs["diffusers_bf16"]
        result["bf16_max_abs_diff"] = float((a - b).abs().max())
        result["bf16_vs_fp32_max_abs_diff_latentforge"] = float((a - ref).abs().max())
        result["bf16_vs_fp32_max_abs_diff_diffusers"] = float((b - ref).abs().max())
        result["output_std"] = float(ref.std())
    return result


@click.command("unet", help=__doc__, short_help=one_line(__doc__), context_settings=CONTEXT)
@click.option("--repeats", type=int, default=3, show_default=True,
              help="timed forwards after the warm-up")  # fmt: skip
@click.option("--quick", is_flag=True, help="one timed forward; fewer load runs")
@click.option("--skip-bf16", is_flag=True, help="fp32 only")
@click.option("--skip-load", is_flag=True, help="skip the peak-RSS load check")
@click.option(
    "--tmp", default=None, metavar="DIR", help="folder for the temporary 3.4 GB checkpoint"
)
@click.option("--preset", type=click.Choice(["sd15", "sdxl"]), default="sd15", show_default=True,
              help="which U-Net: SD 1.5's or SDXL's base")  # fmt: skip
@click.option("--latent", type=click.IntRange(8, 256), default=64, show_default=True,
              help="latent side (SD 1.5 at 512 px: 64; SDXL at 1024 px: 128)")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(as_json: bool, **kw) -> int:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("bench unet needs diffusers: pip install diffusers", file=sys.stderr)
        return 2
    result = run(**kw)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>40}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python bench/unet.py ARGS`: the same as `latentforge bench unet ARGS`."""
    return script_main(command, argv)

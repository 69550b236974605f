"""`latentforge bench lora`: the time to load and fuse a LoRA into an SD-1.5-sized model, to
restore it, and what a fused LoRA costs per denoising step.

What is built (nothing is downloaded): SD 1.5's U-Net (860M parameters, small random weights)
and a CLIP text model of SD's size (768 wide, 12 layers, transformers' seeded initialisation);
a random kohya LoRA of rank `--rank` (alpha = rank) over every attention projection of both
(`models.lora.target_layers`: to_q / to_k / to_v / to_out.0 and q / k / v / out_proj), written
with `io.lora.save_lora` to a temporary .safetensors file.

What is measured, `--repeats` times (the median is reported, the minimum beside it):
`load_s` is what applying the file costs (wall clock; `*_cpu_s`: the CPU seconds of all
threads, which a CPU shared with other work inflates less), `read_s` (the file read, keys
mapped onto the layers, every factor checked: `io.lora.lora_layers`) plus `fuse_s` (the deltas
added into the weights, the originals kept: `models.lora.fuse`); `unfuse_s` puts them back
(`models.lora.restore`; `restored_exactly` checks every touched weight bit for bit). The file
is read from the page cache after the first round, as a server's repeat request would be
(whose LoRA cache skips `read_s` altogether). Generation: one U-Net forward of a batch of 2
(a guided step) at `--latent` x `--latent` latents, the plain model and the fused one taking
turns; `step_ratio` is fused / plain (a fused LoRA changes weights, not the network, so it
should cost nothing).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from ..io.lora import TEXT, UNET, LoraSpec, lora_layers, save_lora
from ..models.lora import LoraFactors, fuse, restore, target_layers
from ..models.unet import count_parameters
from . import CONTEXT, one_line, script_main
from .sd import PRESETS
from .unet import _random_unet


def _clip_text_model(seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**PRESETS["sd15"]["clip"])
    return transformers.CLIPTextModel(config).eval()


def _random_lora(roots: dict, rank: int, path: Path, seed: int) -> int:
    """A rank-`rank` kohya LoRA over every attention projection of `roots`; its layer count."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for part, root in roots.items():
        for name in target_layers(root):
            out_f, in_f = root.get_submodule(name).weight.shape
            down = torch.randn(rank, in_f, generator=g) / in_f**0.5
            up = torch.randn(out_f, rank, generator=g) * 0.01
            factors[(part, name)] = LoraFactors(down, up, float(rank))
    save_lora(path, factors, "kohya")
    return len(factors)


def _stats(result: dict, name: str, times: list[float]) -> None:
    result[f"{name}"] = round(statistics.median(times), 4)
    result[f"{name}_min"] = round(min(times), 4)


def run(*, rank: int, repeats: int, latent: int, threads: int | None) -> dict:
    """The benchmark's record (the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    unet, clip = _random_unet(0), _clip_text_model(0)
    roots = {UNET: unet, TEXT: clip}
    result: dict = {
        "threads": torch.get_num_threads(),
        "unet_parameters": count_parameters(unet),
        "text_parameters": count_parameters(clip),
        "rank": rank,
        "repeats": repeats,
    }
    times: dict[str, list[float]] = {k: [] for k in ("read_s", "fuse_s", "load_s", "unfuse_s",
                                                      "load_cpu_s", "unfuse_cpu_s")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        result["lora_layers"] = _random_lora(roots, rank, path, seed=1)
        result["lora_file_bytes"] = path.stat().st_size
        spec = LoraSpec(path)
        exact = True
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            layers = lora_layers(roots, [spec])
            t1 = time.perf_counter()
            saved = {part: fuse(roots[part], items) for part, items in layers.items()}
            c2, t2 = time.process_time(), time.perf_counter()
            for part, s in saved.items():
                restore(roots[part], s)
            c3, t3 = time.process_time(), time.perf_counter()
            for key, value in (("read_s", t1 - t0), ("fuse_s", t2 - t1), ("load_s", t2 - t0),
                               ("unfuse_s", t3 - t2), ("load_cpu_s", c2 - c0),
                               ("unfuse_cpu_s", c3 - c2)):  # fmt: skip
                times[key].append(value)
            exact &= all(
                torch.equal(roots[part].get_submodule(n).weight, w)
                for part, s in saved.items()
                for n, w in s.items()
            )
        for key, ts in times.items():
            _stats(result, key, ts)
        result["restored_exactly"] = exact

        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 4, latent, latent, generator=g)  # (B, C, h, w): a guided step
        t = torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, 768, generator=g)
        step: dict[str, list[float]] = {"plain": [], "fused": []}
        with torch.inference_mode():
            unet(x, t, context=ctx)  # warm-up
            for _ in range(repeats):
                for kind in ("plain", "fused"):
                    saved = fuse(unet, layers[UNET]) if kind == "fused" else {}
                    t0 = time.perf_counter()
                    unet(x, t, context=ctx)
                    step[kind].append(time.perf_counter() - t0)
                    restore(unet, saved)
    _stats(result, "plain_step_s", step["plain"])
    _stats(result, "fused_step_s", step["fused"])
    result["latent"] = latent
    result["step_ratio"] = round(
        statistics.median(step["fused"]) / statistics.median(step["plain"]), 3
    )
    return result


@click.command("lora", help=__doc__, short_help=one_line(__doc__), context_settings=CONTEXT)
@click.option("--rank", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True,
              help="timed rounds of load / unfuse and of each forward")  # fmt: skip
@click.option("--latent", type=click.IntRange(8, 128), default=64, show_default=True,
              help="latent side of the timed U-Net forwards (64: SD's 512 px)")  # fmt: skip
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(as_json: bool, **kw) -> int:
    result = run(**kw)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`latentforge bench lora ARGS` as a script."""
    return script_main(command, argv)

"""`latentforge bench generate`: the speed of `generate` on a text model, fp32 against bf16.

Issue 5's targets are one 64x64 image in under 1 s after the model is loaded and >= 10
images/s in batches. For each precision (fp32, and bf16 autocast unless `--skip-bf16`) this
times, after one warm-up of each: one image (best of `--repeats`), and a batch of `--batch`
images on a one-object prompt, on a two-object prompt with the model's regions and on it with
`--layout none` (mean of `--repeats`). Text encoding, sampling and decoding are all inside
the clock, as for a user. `bf16_speedup` is fp32 time / bf16 time per setting; the mean and
largest difference of the bf16 images from the fp32 ones (the last setting, pixels in
[-1, 1]) are reported too: a few edge pixels flip where an outline moves by one pixel. bf16
is fast only where the CPU has bf16 units (AVX512-BF16, AMX) or on a GPU; `cpu_bf16` says
whether oneDNN found them.
"""

from __future__ import annotations

import json
import time

import click
import torch

from ..io.model_folder import load_diffusion_model
from ..pipelines.generate import generate
from . import CONTEXT, one_line, script_main

ONE = "a large yellow star in the center on a blue background"
TWO = "a small red circle above a blue square on a white background"


def run(*, model_dir: str | None, batch: int, steps: int, repeats: int, skip_bf16: bool) -> dict:
    """The benchmark's record (the module docstring), values rounded to 4 decimals."""
    model = load_diffusion_model(model_dir)
    if model.text_encoder is None:
        raise SystemExit("bench generate needs a text model (the embedded one by default)")
    kw = {"steps": steps}
    settings = {
        "batch_one_object": dict(prompts=[ONE], num=batch),
        "batch_two_objects_regions": dict(prompts=[TWO], num=batch),
        "batch_two_objects_no_layout": dict(prompts=[TWO], num=batch, layout="none"),
    }
    out: dict = {
        "model": model.sha256 or "embedded",
        "steps": steps,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }
    precisions = [False] if skip_bf16 else [False, True]
    images = {}
    for bf16 in precisions:
        name = "bf16" if bf16 else "fp32"

        def once(bf16: bool = bf16, **cond) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                images[bf16] = generate(model, seed=0, bf16=bf16, **cond, **kw)
            return time.perf_counter() - t0

        once(prompts=[ONE], num=1)  # warm-up
        once(**settings["batch_one_object"])
        out[f"{name}_one_image_s"] = min(once(prompts=[ONE]) for _ in range(repeats))
        for key, cond in settings.items():
            seconds = sum(once(**cond) for _ in range(repeats)) / repeats
            out[f"{name}_{key}_images_per_s"] = cond["num"] / seconds
    if not skip_bf16:
        diff = (images[True] - images[False]).abs()  # the last setting's images, [-1, 1]
        out["bf16_mean_abs_diff"], out["bf16_max_abs_diff"] = float(diff.mean()), float(diff.max())
        out["bf16_speedup_one_image"] = out["fp32_one_image_s"] / out["bf16_one_image_s"]
        for key in settings:
            out[f"bf16_speedup_{key}"] = (
                out[f"bf16_{key}_images_per_s"] / out[f"fp32_{key}_images_per_s"]
            )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


@click.command("generate", help=__doc__, short_help=one_line(__doc__), context_settings=CONTEXT)
@click.option("--model", "model_dir", default=None, metavar="DIR",
              help="text model folder (default: the embedded one)")  # fmt: skip
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True)
@click.option("--skip-bf16", is_flag=True, help="fp32 only")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(as_json: bool, **kw) -> int:
    result = run(**kw)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>44}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python bench/generate.py ARGS`: the same as `latentforge bench generate ARGS`."""
    return script_main(command, argv)

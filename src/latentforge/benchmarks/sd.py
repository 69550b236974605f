"""`latentforge bench sd`: SD text-to-image end to end, latentforge against diffusers.

What is built: an SD-1.5-sized pipeline in diffusers' format, from configs only (nothing is
downloaded), with seeded random weights: SD 1.5's U-Net (860M parameters), SD's VAE, a CLIP
text model of SD's size (768 wide, 12 layers) with a character-level CLIP tokenizer, and SD's
scheduler config (scaled_linear 0.00085..0.012, steps_offset 1). It is saved with
`save_pretrained` (safetensors) and imported with `latentforge import`'s `import_model`, so
latentforge loads its own native folder as a user would. `--cache DIR` keeps both folders for
later runs (about 8.6 GB; building them takes a minute or two); by default they live in a
temporary folder deleted afterwards. `--preset tiny` builds diffusers' tiny test pipeline
instead (every weight perturbed, as tests/conftest.py does, so no zero layer hides a
difference), made in a second.

What is measured: each library runs in a process of its own on the same device and dtype
(diffusers `torch_dtype=`, latentforge `load_diffusion_model(dtype=)`). The two load one after
the other, each makes an untimed warm-up call of `--warmup-steps` steps, then they take turns
(A B, B A, ...) timing `--repeats` calls of one image each (batch 1, one prompt, guidance 7.5,
`--steps` steps, `--size` px square), so that drift in a shared machine hits both alike; text
encoding, sampling and VAE decoding are all inside the clock. The best call is
`*_s_per_image`, `*_its` is steps / that, `time_ratio` latentforge / diffusers. Peak memory is
each process's own high-water mark: on the CPU the peak RSS (VmHWM, loading included;
`*_gen_peak_mem_bytes` is the peak from the warm-up on, after `gc.collect()` and a reset of
the mark through /proc/self/clear_refs), on CUDA `torch.cuda.max_memory_allocated`. (diffusers'
loader leaves the memory-mapped weight files in a reference cycle, resident until Python's
cycle collector runs: 3.3 GB of RSS for the U-Net at bf16; without the collect, when that
happens, and so the generation peak, varied from run to run.) Both start from the SAME
initial latents, drawn once (seeded, rounded to the run's dtype) and passed as diffusers'
`latents=` and latentforge's `noise=`; `max_abs_diff` is the largest difference of the two
images in [-1, 1]. Without accelerate installed diffusers loads with
`low_cpu_mem_usage=False` (a randomly initialised model, then the weights copied in), which
raises its loading peak; `diffusers_low_cpu_mem_usage` says which.

How the configurations match (the same computation, step for step):

* ddim: diffusers' `DDIMScheduler.from_config(sd, set_alpha_to_one=True)` (eta 0) is
  latentforge's `ddim` under SD's "leading" spacing (t = 951, 901, ..., 1 for 20 steps).
  SD's own config has `set_alpha_to_one=False`: its last step goes to alpha_bar[0]
  (sigma 0.029) rather than to sigma 0, where latentforge's samplers end; True makes both end
  at sigma 0 (tests/test_sd_pipeline.py shows the stock config differs by exactly that step).
* dpmpp_2m: diffusers' `DPMSolverMultistepScheduler.from_config(sd, use_karras_sigmas=True)`
  (dpmsolver++, order 2, `final_sigmas_type="zero"`) is latentforge's `dpmpp_2m` with
  `spacing="karras"` (rho 7 between the schedule's sigma_min 0.029 and sigma_max 14.6) and two
  matched details. (1) diffusers takes a first-order step into sigma 0, x0 = D(x, sigma_last)
  (`final_sigmas_type="zero"` forces `lower_order_final` on the last step, whatever the step
  count), while latentforge's default `final_step="ab2"` extrapolates; the benchmark passes
  `final_step="denoised"`, the same plain step (from Karras' last level, sigma 0.029, the two
  final steps differ by ~1e-5 in the images). (2) With Karras sigmas diffusers rounds the
  U-Net's timesteps to integers (the update itself uses the exact sigmas); latentforge feeds
  the fractional t of each sigma. The difference grows with the steps (5e-3 in the tiny
  pipeline's images at 20 steps, none at 2 steps, whose levels are t = 999 and 0 exactly), so
  by default (`--round-t`) the latentforge process rounds its denoiser's `sigma_to_t` too, as
  tests/test_scheduler_conformance.py does; `--no-round-t` shows latentforge's own behaviour.
  Neither change costs time. Then the images agree to ~1e-5 in fp32.

At fp16 / bf16 the two are not the same computation: latentforge keeps the text encoder in
fp32 (and at fp16 the VAE too, since SD's overflows in fp16), diffusers casts the whole
pipeline; `max_abs_diff` then measures that. `cpu_bf16` says whether the CPU has bf16 units
(avx512_bf16 or AMX in /proc/cpuinfo); without them bf16 is emulated and slow.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import UserError
from ..io.model_folder import DTYPES, check_dtype, resolve_device
from . import CONTEXT, one_line, script_main

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
SAMPLERS = ("dpmpp_2m", "ddim")
LIBRARIES = ("latentforge", "diffusers")

# SD 1.x's scheduler_config.json (saved as a DDIMScheduler; each side configures from it)
SD_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

PRESETS: dict[str, dict[str, Any]] = {
    "sd15": {  # SD 1.5's U-Net, SD's VAE, a CLIP ViT-L/14 text model's size
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        "clip": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        "perturb": 0.0,  # diffusers' / transformers' own initialisation, seeded
    },
    "tiny": {  # diffusers' tiny SD test config (tests/conftest.py)
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 2,
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "block_out_channels": (32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 64,
        },
        "clip": {
            "vocab_size": 520,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
        },
        "perturb": 0.05,  # every weight nonzero, as tests/conftest.py's `perturbed`
    },
}

# What each library's process runs (a script of its own, so that diffusers' process imports no
# latentforge and each process's peak memory is that library's alone).
_CHILD = r"""
import gc, json, os, resource, sys, time
import torch

def peak_rss():
    # VmHWM: this process's own high-water mark (ru_maxrss can report the parent's after exec)
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None

def reset_peak_rss():
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

# replies go to the parent on the real stdout; anything a library prints goes to stderr
_replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

def emit(reply):
    _replies.write(json.dumps(reply) + "\n")
    _replies.flush()

spec = json.loads(sys.argv[1])
device = torch.device(spec["device"])
cuda = device.type == "cuda"
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
size, prompt, guidance = spec["size"], spec["prompt"], spec["guidance"]
latents = torch.load(spec["latents"])

def sync():
    if cuda:
        torch.cuda.synchronize(device)

def peak_mem():
    return torch.cuda.max_memory_allocated(device) if cuda else peak_rss()

if spec["library"] == "diffusers":
    import diffusers
    base_rss = rss()
    t0 = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        spec["folder"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    sd = pipe.scheduler.config
    if spec["sampler"] == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(sd, set_alpha_to_one=True)
    else:
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            sd, use_karras_sigmas=True
        )
    x = latents.to(device, dtype)

    def once(steps):
        images = pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, latents=x.clone(),
            height=size, width=size, output_type="pt",
        ).images
        return images.float().cpu() * 2 - 1  # "pt" is (decoded / 2 + 0.5).clamp(0, 1)
else:
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.pipelines.generate import generate
    base_rss = rss()
    t0 = time.perf_counter()
    model = load_diffusion_model(spec["folder"], device=device, dtype=spec["dtype"])
    if spec["sampler"] == "ddim":
        kw = {"sampler": "ddim", "spacing": "leading"}
    else:
        kw = {"sampler": "dpmpp_2m", "spacing": "karras", "final_step": "denoised"}
        if spec["round_t"]:  # diffusers' integer timesteps under Karras sigmas
            den = model.denoiser
            exact = den.sigma_to_t
            den.sigma_to_t = lambda sigma: exact(sigma).round()

    def once(steps):
        return generate(
            model, prompts=[prompt], steps=steps, guidance=guidance, noise=latents,
            width=size, height=size, **kw,
        ).float().cpu()
sync()
load_s = time.perf_counter() - t0
load_peak, load_rss = peak_mem(), peak_rss()
gc.collect()  # diffusers' loader leaves the mmap'd safetensors in a reference cycle
if cuda:
    torch.cuda.reset_peak_memory_stats(device)
reset = reset_peak_rss()
emit({"load_s": load_s, "threads": torch.get_num_threads(), "base_rss": base_rss})
image = None
for line in sys.stdin:  # the parent's orders, one JSON object a line
    order = json.loads(line)
    if order["op"] == "run":
        sync()
        t0 = time.perf_counter()
        out = once(order["steps"])
        sync()
        seconds = time.perf_counter() - t0
        if order["keep"]:
            image = out
        emit({"seconds": seconds})
    else:  # "finish"
        gen_peak, gen_rss = peak_mem(), peak_rss()
        torch.save(image, spec["image"])
        emit({
            "peak_mem": max(load_peak, gen_peak) if reset or cuda else gen_peak,
            "gen_peak_mem": gen_peak if reset or cuda else None,
            "peak_rss": max(load_rss, gen_rss) if reset else gen_rss,
        })
        break
"""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def cpu_bf16_units() -> bool:
    """Whether the CPU has bf16 arithmetic units: avx512_bf16 or AMX in /proc/cpuinfo's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def grid(preset: str) -> int:
    """Output sizes must be multiples of this: the VAE's downsampling times the U-Net's."""
    p = PRESETS[preset]
    return 2 ** (len(p["vae"]["block_out_channels"]) - 1) * 2 ** (
        len(p["unet"]["block_out_channels"]) - 1
    )


def vae_factor(preset: str) -> int:
    return 2 ** (len(PRESETS[preset]["vae"]["block_out_channels"]) - 1)


def char_tokenizer():
    """A character-level CLIP tokenizer: every byte and byte</w> a token, no merges (a valid
    vocab.json + merges.txt once saved), <|startoftext|> = 512, <|endoftext|> = 513."""
    import transformers

    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs + [256 + i for i in range(256 - len(bs))]
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _perturbed(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def build_diffusers_folder(dst: Path, preset: str, seed: int = 0) -> None:
    """A StableDiffusionPipeline folder of `preset`'s configs with seeded random weights, as
    `save_pretrained` writes it (safetensors)."""
    import diffusers
    import transformers

    p = PRESETS[preset]
    torch.manual_seed(seed)
    unet = _perturbed(diffusers.UNet2DConditionModel(**p["unet"]), seed + 1, p["perturb"])
    torch.manual_seed(seed + 2)
    vae = _perturbed(diffusers.AutoencoderKL(**p["vae"]), seed + 3, p["perturb"])
    torch.manual_seed(seed + 4)
    ids = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}  # char_tokenizer's
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**p["clip"], **ids)).eval()
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=clip, tokenizer=char_tokenizer(),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(dst, safe_serialization=True)


def prepare_folders(root: Path, preset: str, seed: int) -> tuple[Path, Path, float | None]:
    """(diffusers folder, native latentforge folder, seconds spent building or None when
    reused) under `root`/PRESET-seedSEED, built unless a complete earlier build is there."""
    from ..io.diffusers_format import import_model

    base = root / f"{preset}-seed{seed}"
    src, native, stamp = base / "diffusers", base / "latentforge", base / "built.json"
    want = {"preset": preset, "seed": seed, "configs": json.loads(json.dumps(PRESETS[preset]))}
    try:
        if json.loads(stamp.read_text()) == want:
            return src, native, None
    except (OSError, ValueError):
        pass
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    t0 = time.perf_counter()
    build_diffusers_folder(src, preset, seed)
    gc.collect()
    import_model(src, native)
    stamp.write_text(json.dumps(want))  # last: a folder without it is rebuilt
    return src, native, time.perf_counter() - t0


class LibraryProcess:
    """One library's process (`_CHILD`): it loads the pipeline, then runs what it is told, one
    JSON order a line on its stdin and one JSON reply a line on its stdout; its stderr goes to
    `log`. Both processes stay up so that their timed images can alternate."""

    def __init__(self, library: str, spec: dict, log: Path):
        self.library, self.log = library, log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, json.dumps({**spec, "library": library})],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.ready = self._reply()  # load_s, threads, base_rss

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"bench sd: the {self.library} process failed "
                f"(status {self.proc.returncode}):\n{tail}"
            )
        return json.loads(line)

    def ask(self, **order: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def time_libraries(spec: dict, folders: dict[str, Path], work: Path) -> dict[str, dict]:
    """Load each library in its own process (one after the other), warm both up, then time
    `repeats` images each, alternating (A B, B A, ...) so that drift in a shared machine hits
    both alike. Per library: load_s, threads, base_rss, times, peak_mem, gen_peak_mem,
    peak_rss, and the last timed image (`image`, a tensor)."""
    procs: dict[str, LibraryProcess] = {}
    try:
        for lib in LIBRARIES:
            print(f"bench sd: loading {lib} ...", file=sys.stderr)
            image = str(work / f"{lib}.pt")
            procs[lib] = LibraryProcess(
                lib, {**spec, "folder": str(folders[lib]), "image": image}, work / f"{lib}.log"
            )
        times: dict[str, list[float]] = {lib: [] for lib in LIBRARIES}
        if spec["warmup_steps"]:
            for lib in LIBRARIES:
                print(f"bench sd: warming up {lib} ...", file=sys.stderr)
                procs[lib].ask(op="run", steps=spec["warmup_steps"], keep=False)
        for r in range(spec["repeats"]):
            for lib in LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]:
                print(f"bench sd: timing {lib} ({r + 1}/{spec['repeats']}) ...", file=sys.stderr)
                times[lib].append(
                    procs[lib].ask(op="run", steps=spec["steps"], keep=True)["seconds"]
                )
        out = {}
        for lib, proc in procs.items():
            out[lib] = {**proc.ready, **proc.ask(op="finish"), "times": times[lib]}
            out[lib]["image"] = torch.load(work / f"{lib}.pt")
        return out
    finally:
        for proc in procs.values():
            proc.close()


def run(
    *,
    preset: str = "sd15",
    cache: str | None = None,
    tmp: str | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    size: int = 512,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    repeats: int = 1,
    warmup_steps: int = 2,
    seed: int = 0,
    round_t: bool = True,
) -> dict:
    """The benchmark's record (the module docstring)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; use {', '.join(PRESETS)}")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use {', '.join(SAMPLERS)}")
    dev = resolve_device(device)
    check_dtype(dtype, dev)
    if size < grid(preset) or size % grid(preset):
        raise UserError(f"--size must be a positive multiple of {grid(preset)} for {preset}")
    if steps < 1 or repeats < 1 or warmup_steps < 0:
        raise UserError("--steps and --repeats must be >= 1, --warmup-steps >= 0")
    if tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
    import diffusers
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-sd.", dir=tmp) as work_dir:
        work = Path(work_dir)
        root = Path(cache) if cache else work
        print(f"bench sd: preparing the {preset} folders in {root} ...", file=sys.stderr)
        src, native, build_s = prepare_folders(root, preset, seed)
        f = vae_factor(preset)
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, 4, size // f, size // f), generator=g)
        latents = latents.to(DTYPES[dtype]).float()  # what both get, diffusers in its dtype
        torch.save(latents, work / "latents.pt")
        spec = {
            "device": str(dev), "dtype": dtype, "size": size, "steps": steps,
            "sampler": sampler, "repeats": repeats, "warmup_steps": warmup_steps,
            "prompt": PROMPT, "guidance": GUIDANCE, "round_t": round_t,
            "latents": str(work / "latents.pt"),
        }  # fmt: skip
        got = time_libraries(spec, {"latentforge": native, "diffusers": src}, work)
    images = {lib: got[lib]["image"] for lib in LIBRARIES}
    diff = (images["latentforge"] - images["diffusers"]).abs()
    lf, df = got["latentforge"], got["diffusers"]
    lf_s, df_s = min(lf["times"]), min(df["times"])
    out: dict[str, Any] = {
        "preset": preset, "device": str(dev), "dtype": dtype, "size": size, "steps": steps,
        "sampler": sampler, "guidance": GUIDANCE, "repeats": repeats,
        "warmup_steps": warmup_steps, "round_t": round_t,
        "latentforge_s_per_image": lf_s, "diffusers_s_per_image": df_s,
        "time_ratio": lf_s / df_s,
        "latentforge_its": steps / lf_s, "diffusers_its": steps / df_s,
        "latentforge_peak_mem_bytes": lf["peak_mem"], "diffusers_peak_mem_bytes": df["peak_mem"],
        "mem_ratio": lf["peak_mem"] / df["peak_mem"],
        "peak_mem_kind": "cuda_max_memory_allocated" if dev.type == "cuda" else "peak_rss",
        "latentforge_gen_peak_mem_bytes": lf["gen_peak_mem"],
        "diffusers_gen_peak_mem_bytes": df["gen_peak_mem"],
        "gen_mem_ratio": (
            lf["gen_peak_mem"] / df["gen_peak_mem"] if lf["gen_peak_mem"] and df["gen_peak_mem"]
            else None
        ),
        "latentforge_peak_rss_bytes": lf["peak_rss"], "diffusers_peak_rss_bytes": df["peak_rss"],
        "latentforge_import_rss_bytes": lf["base_rss"],
        "diffusers_import_rss_bytes": df["base_rss"],
        "latentforge_load_s": lf["load_s"], "diffusers_load_s": df["load_s"],
        "latentforge_all_s": lf["times"], "diffusers_all_s": df["times"],
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "image_shape": list(images["latentforge"].shape),
        "build_s": build_s, "threads": lf["threads"], "cpu": cpu_name(),
        "cpu_bf16": cpu_bf16_units(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "diffusers_low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip
    return {
        k: (v if k.endswith("_diff") else round(v, 4)) if isinstance(v, float)
        else [round(t, 4) for t in v] if k.endswith("_all_s") else v
        for k, v in out.items()
    }  # fmt: skip


def table(r: dict) -> str:
    """The record as a short table (what `bench sd` prints without --json)."""
    gb = 1024**3
    lf_mem, df_mem = r["latentforge_peak_mem_bytes"] / gb, r["diffusers_peak_mem_bytes"] / gb
    rows = [
        f"bench sd: {r['preset']} {r['size']}x{r['size']}, {r['steps']} steps {r['sampler']}, "
        f"{r['device']} {r['dtype']}, {r['threads']} threads, {r['cpu']}",
        f"{'':>22}{'latentforge':>14}{'diffusers':>14}{'ratio':>9}",
        f"{'seconds / image':>22}{r['latentforge_s_per_image']:>14.3f}"
        f"{r['diffusers_s_per_image']:>14.3f}{r['time_ratio']:>9.3f}",
        f"{'it/s':>22}{r['latentforge_its']:>14.3f}{r['diffusers_its']:>14.3f}",
        f"{'peak memory (GiB)':>22}{lf_mem:>14.2f}{df_mem:>14.2f}{r['mem_ratio']:>9.3f}",
        f"{'load (s)':>22}{r['latentforge_load_s']:>14.2f}{r['diffusers_load_s']:>14.2f}",
        f"max |image difference| {r['max_abs_diff']:.2e} (images in [-1, 1])",
    ]
    return "\n".join(rows)


@click.command("sd", help=__doc__, short_help=one_line(__doc__), context_settings=CONTEXT)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="sd15", show_default=True,
              help="sd15: SD-1.5-sized random pipeline; tiny: the test-sized one")  # fmt: skip
@click.option("--cache", default=None, metavar="DIR",
              help="keep the built folders here, reuse them (default: a temp folder)")  # fmt: skip
@click.option("--tmp", default=None, metavar="DIR", help="where the temporary folder goes")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="weights and compute (fp16: GPUs only)")  # fmt: skip
@click.option("--size", type=int, default=512, show_default=True, help="height = width, px")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--sampler", type=click.Choice(SAMPLERS), default="dpmpp_2m", show_default=True,
              help="dpmpp_2m: Karras sigmas; ddim: leading spacing")  # fmt: skip
@click.option("--repeats", type=int, default=1, show_default=True,
              help="timed images after the warm-up (the best is reported)")  # fmt: skip
@click.option("--warmup-steps", type=int, default=2, show_default=True,
              help="steps of the untimed warm-up call (0: none)")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="weights and latents")
@click.option("--round-t/--no-round-t", default=True, show_default=True,
              help="dpmpp_2m: round the U-Net's timesteps as diffusers does")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def command(as_json: bool, **kw: Any) -> int:
    for name in ("diffusers", "transformers"):
        if importlib.util.find_spec(name) is None:
            print(f"bench sd needs {name}: pip install diffusers transformers", file=sys.stderr)
            return 2
    result = run(**kw)
    print(json.dumps(result, indent=2) if as_json else table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python bench/sd.py ARGS`: the same as `latentforge bench sd ARGS`."""
    return script_main(command, argv)

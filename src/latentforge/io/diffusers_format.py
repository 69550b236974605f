"""Stable Diffusion weights in and out: diffusers folders and single files <-> native folders.

Import reads a diffusers pipeline folder (model_index.json; unet/, vae/, text_encoder/,
tokenizer/, scheduler/) or an original single-file checkpoint (`io/ldm.py`) and writes a
native latent model folder: model.json + model.safetensors (U-Net), vae/, text_encoder/ and
tokenizer/ (transformers format, copied as-is). Every source key must land on a parameter and
every parameter must be filled (one error lists all mismatches); weights are read tensor by
tensor (`io/lazy.py`). Export writes a folder that diffusers' `from_pretrained` loads.

Native module names equal diffusers' (UNet2DConditionModel, AutoencoderKL), so weights cross
with their names unchanged; only configs are translated, and features latentforge does not
implement are refused by name instead of being silently dropped.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..models.presets import UNetConfig
from ..models.unet import UNet
from ..models.vae import AutoencoderKL, VAEConfig
from . import ldm
from .checkpoint import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    PICKLE_SUFFIXES,
    replace_dir_atomic,
    save_tensors_atomic,
    write_json_atomic,
)
from .diffusers_config import (
    consistency_from_scheduler,
    diffusers_version,
    guidance_embedding_from_diffusers,
    parameterization_from_scheduler,
    scheduler_from_parameterization,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from .lazy import (
    LazyState,
    build_module,
    check_float_weights,
    check_strict,
    load_all,
    meta_module,
    open_sharded,
    open_weights,
)
from .model_folder import (
    DataInfo,
    LatentInfo,
    ModelFolder,
    ModelMeta,
    SamplingDefaults,
    read_model_meta,
    save_model_folder,
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
SD_SAMPLING = {"sampler": "ddim", "steps": 50, "spacing": "leading", "guidance": 7.5}
SDXL_SAMPLING = {"sampler": "euler", "steps": 50, "spacing": "leading", "guidance": 5.0}


# --------------------------------------------------------------------------- reading sources


def _read_json(path: Path) -> dict:
    """A config file as a dict; anything else (`[]`, bad UTF-8, deep nesting) is one line."""
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise UserError(f"cannot read {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, json's own limits
        raise UserError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def _component(src: Path, name: str) -> Path:
    """`src/name` in a pipeline folder, or `src` itself when it is that component's folder."""
    if (src / name / "config.json").is_file():
        return src / name
    if (src / "config.json").is_file():
        cls = _read_json(src / "config.json").get("_class_name")
        if cls != _CLASSES[name]:
            raise UserError(f"{src} holds a {cls}, not a {_CLASSES[name]}")
        return src
    raise UserError(f"{src}: no {name}/config.json (not a diffusers folder?)")


def _weights(folder: Path, stem: str, allow_pickle: bool) -> LazyState:
    """A component's weights: safetensors (plain, sharded or the fp16 variant), else a pickle."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return open_weights(folder / name)
    for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
        if (folder / name).is_file():
            return open_sharded(folder / name)
    pickles = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return open_weights(pickles[0], allow_pickle=allow_pickle)
    raise UserError(f"{folder}: no {stem}.safetensors")


def _strict_native(factory, state: LazyState, what: str) -> None:
    check_strict(meta_module(factory, what), state, what)


_VAE_LEGACY = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def _vae_legacy_names(state: LazyState, c: VAEConfig) -> LazyState:
    """Old diffusers VAE attention names (query/key/value/proj_attn) -> today's."""
    out = {}
    for k, v in state.items():
        for old, new in _VAE_LEGACY.items():
            k = k.replace(old, new) if ".attentions." in k else k
        out[k] = v
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in AutoencoderKL(c).state_dict().items()}
    return ldm.rename(out, {k: k for k in shapes}, shapes)


def load_unet_lazy(
    src: str | Path, *, allow_pickle: bool = False, num_heads=None
) -> tuple[UNetConfig, LazyState]:
    """U-Net config + strictly checked, not-yet-read native state from a diffusers folder (or its
    unet/), a single-file checkpoint or a native model folder."""
    config, state, _ = _unet_parts(src, allow_pickle, num_heads)
    return config, state


def _unet_parts(
    src: str | Path, allow_pickle: bool = False, num_heads=None
) -> tuple[UNetConfig, LazyState, dict | None]:
    """`load_unet_lazy`'s (config, state) and the U-Net's guidance embedding, if any (LCM)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"not found: {src}")
    embedding = None
    if src.is_file():
        parts = ldm.split_checkpoint(open_weights(src, allow_pickle=allow_pickle))
        config, state = ldm.unet_from_checkpoint(parts, num_heads)
    elif (src / MODEL_JSON).is_file():  # a native model folder
        meta = ModelFolder.read(src).meta
        config, embedding = UNetConfig.from_dict(meta.unet), meta.guidance_embedding
        state = open_weights(src / MODEL_WEIGHTS)
    else:
        folder = _component(src, "unet")
        unet_json = _read_json(folder / "config.json")
        config = unet_config_from_diffusers(unet_json, folder)
        embedding = guidance_embedding_from_diffusers(unet_json)
        state = _weights(folder, DIFFUSERS_WEIGHTS, allow_pickle)
    kw = {"time_cond_proj_dim": embedding["time_cond_proj_dim"]} if embedding else {}
    _strict_native(lambda: UNet(config, **kw), state, f"U-Net from {src}")
    return config, state, embedding


def load_vae_lazy(
    src: str | Path, *, allow_pickle: bool = False, scaling_factor: float = 0.18215
) -> tuple[VAEConfig, LazyState]:
    src = Path(src)
    if not src.exists():
        raise UserError(f"not found: {src}")
    if src.is_file():
        parts = ldm.split_checkpoint(open_weights(src, allow_pickle=allow_pickle))
        config, state = ldm.vae_from_checkpoint(parts, scaling_factor)
    else:
        folder = _component(src, "vae")
        config = vae_config_from_diffusers(_read_json(folder / "config.json"), folder)
        state = _vae_legacy_names(_weights(folder, DIFFUSERS_WEIGHTS, allow_pickle), config)
    _strict_native(lambda: AutoencoderKL(config), state, f"VAE from {src}")
    return config, state


def load_unet(
    src: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """(UNetConfig, native state dict) from a diffusers folder, a single file or a native folder."""
    config, state = load_unet_lazy(src, allow_pickle=allow_pickle)
    return config, load_all(state, dtype)


def load_vae(
    src: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """(VAEConfig, native state dict) from a diffusers folder (or its vae/) or a single file."""
    config, state = load_vae_lazy(src, allow_pickle=allow_pickle)
    return config, load_all(state, dtype)


def load_unet_module(
    src: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> UNet:
    """A ready U-Net (eval mode), built on the meta device and filled tensor by tensor."""
    config, state, embedding = _unet_parts(src, allow_pickle)
    kw = {"time_cond_proj_dim": embedding["time_cond_proj_dim"]} if embedding else {}
    unet = build_module(lambda: UNet(config, **kw), state, f"U-Net from {src}", dtype=dtype)
    return unet.eval().requires_grad_(False)


# --------------------------------------------------------------------------- text encoders


def _copy_text_encoder(src: Path, dst: Path, allow_pickle: bool) -> None:
    """A transformers text-encoder folder, copied as-is (a pickle-only one converted); integer
    tensors where weights belong are refused."""
    dst.mkdir(parents=True)
    files = [p for p in src.iterdir() if p.is_file()]
    for p in files:
        if p.name.endswith(".safetensors"):
            check_float_weights(open_weights(p), f"text encoder {p}")
    has_safetensors = any(
        p.name.endswith((".safetensors", ".safetensors.index.json")) for p in files
    )
    for p in files:
        if p.suffix in PICKLE_SUFFIXES:
            if has_safetensors:
                continue
            state = open_weights(p, allow_pickle=allow_pickle)
            check_float_weights(state, f"text encoder {p}")
            tensors = load_all(state)
            save_tensors_atomic(dst / "model.safetensors", tensors, {"format": "pt"})
        elif p.name == "model.fp16.safetensors" and not (src / "model.safetensors").exists():
            shutil.copy2(p, dst / "model.safetensors")
        else:
            shutil.copy2(p, dst / p.name)


# --------------------------------------------------------------------------- import


def _from_diffusers(src: Path, work: Path, opts: dict) -> dict:
    allow = opts["allow_pickle"]
    unet_config, unet_state, embedding = _unet_parts(src, allow)
    vae_config, vae_state = load_vae_lazy(src, allow_pickle=allow)
    notes = []
    sched = src / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        scheduler = _read_json(sched)
    else:
        scheduler = {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": opts.get("prediction") or "epsilon",
        }
        notes.append("no scheduler/scheduler_config.json: assumed SD's scaled_linear schedule")
    if opts.get("prediction"):
        scheduler["prediction_type"] = {"eps": "epsilon", "v": "v_prediction"}[opts["prediction"]]
    unet_json = _read_json(_component(src, "unet") / "config.json")
    text = None
    if (src / "text_encoder_2" / "config.json").is_file():
        text = _sdxl_text_encoders(src, work, allow, notes)
    elif (src / "text_encoder" / "config.json").is_file():
        _copy_text_encoder(src / "text_encoder", work / "text_encoder", allow)
        text = {"type": "clip", "path": "text_encoder", "tokenizer": "tokenizer", "clip_skip": 1}
        tok = opts.get("tokenizer") or src / "tokenizer"
        if Path(tok).is_dir():
            shutil.copytree(tok, work / "tokenizer")
        else:
            notes.append("no tokenizer/ folder: copy a CLIP tokenizer to DST/tokenizer")
    elif unet_config.cross_attention_dim:
        notes.append("no text_encoder/: the model needs one for text prompts")
    if unet_config.addition_time_embed_dim and (text or {}).get("type") != "sdxl":
        raise UserError(f"{src}: an SDXL U-Net needs text_encoder_2/ (OpenCLIP bigG) beside it")
    spec = parameterization_from_scheduler(scheduler)
    consistency = consistency_from_scheduler(scheduler)
    sampling = None
    if consistency is not None:  # an LCM: its own sampler, guidance embedded (one pass a step)
        spec["consistency"] = consistency
        sampling = {"sampler": "lcm", "steps": 4, "spacing": "lcm", "guidance": 1.0}
    if sampling is None and unet_config.addition_time_embed_dim:
        sampling = {**SDXL_SAMPLING, "spacing": scheduler.get("timestep_spacing", "leading")}
    return {
        "unet": (unet_config, unet_state),
        "vae": (vae_config, vae_state),
        "spec": spec,
        "guidance_embedding": embedding,
        "sampling": sampling,
        "sample_size": unet_json.get("sample_size") or 64,
        "spacing": scheduler.get("timestep_spacing", "leading"),
        "text": text,
        "notes": notes,
        "format": "diffusers",
    }


def _sdxl_text_encoders(src: Path, work: Path, allow_pickle: bool, notes: list[str]) -> dict:
    """SDXL's text_encoder (CLIP ViT-L; none in the refiner) and text_encoder_2 (OpenCLIP
    bigG with its projection) with their tokenizers, copied; model_index.json's pipeline
    flags recorded. Returns the model folder's text_encoder block."""
    index = src / "model_index.json"
    flags = _read_json(index) if index.is_file() else {}
    text = {
        "type": "sdxl",
        "path_2": "text_encoder_2",
        "tokenizer_2": "tokenizer_2",
        "force_zeros_for_empty_prompt": bool(flags.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(flags.get("requires_aesthetics_score", False)),
    }
    pairs = [("text_encoder_2", "tokenizer_2")]
    if (src / "text_encoder" / "config.json").is_file():
        text |= {"path": "text_encoder", "tokenizer": "tokenizer"}
        pairs.insert(0, ("text_encoder", "tokenizer"))
    for encoder, tokenizer in pairs:
        _copy_text_encoder(src / encoder, work / encoder, allow_pickle)
        if not (src / tokenizer).is_dir():
            raise UserError(f"{src}: no {tokenizer}/ folder for {encoder}/")
        shutil.copytree(src / tokenizer, work / tokenizer)
    return text


def _fresh_work_dir(dst: Path) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst} already exists and is not empty; choose a new folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))


def import_model(
    src: str | Path,
    dst: str | Path,
    allow_pickle: bool = False,
    *,
    dtype: torch.dtype | None = None,
    prediction: str | None = None,
    image_size: int | None = None,
    tokenizer: str | Path | None = None,
    num_heads: int | tuple[int, ...] | None = None,
) -> dict:
    """SD weights (diffusers folder or single file) -> a native latent model folder at `dst`.

    dtype None keeps the source's precision (fp16 stays fp16 on disk). For single files, which
    carry no config: `prediction` ("eps" | "v"), `image_size` and `num_heads` override SD's
    conventions, `tokenizer` is a CLIP tokenizer folder to copy. Returns a summary dict.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserError(f"not found: {src}")
    if prediction not in (None, "eps", "v"):
        raise UserError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    opts = {
        "allow_pickle": allow_pickle,
        "dtype": dtype,
        "prediction": prediction,
        "image_size": image_size,
        "tokenizer": tokenizer,
        "num_heads": num_heads,
    }
    work = _fresh_work_dir(dst)
    try:
        read = ldm.read_single_file if src.is_file() else _from_diffusers
        got = read(src, work, opts)
        unet_config, unet_state = got["unet"]
        vae_config, vae_state = got["vae"]
        f = vae_config.downsample_factor
        vae_meta = ModelMeta(
            kind="vae",
            vae=vae_config.to_dict(),
            scaling_factor=vae_config.scaling_factor,
            data=DataInfo(resolution=got["sample_size"] * f, channels=vae_config.in_channels),
        )
        cond = "text" if unet_config.cross_attention_dim else "none"
        meta = ModelMeta(
            kind="diffusion",
            cond="class" if unet_config.num_classes and cond == "none" else cond,
            unet=unet_config.to_dict(),
            parameterization=got["spec"],
            data=DataInfo(
                resolution=got["sample_size"],
                channels=vae_config.latent_channels,
                num_classes=unet_config.num_classes,
                class_names=(),
            ),
            latent=LatentInfo(
                vae="vae",
                scaling_factor=vae_config.scaling_factor,
                image_resolution=got["sample_size"] * f,
                image_channels=vae_config.out_channels,
            ),
            sampling=SamplingDefaults.from_json(
                got.get("sampling") or {**SD_SAMPLING, "spacing": got["spacing"]}, str(src)
            ),
            guidance_embedding=got.get("guidance_embedding"),
            source={"imported_from": str(src), "format": got["format"]},
            text_encoder=got["text"] or None,
        )
        # the descriptions as a later load reads them: a source whose configs pass here but
        # not there (a schedule out of range, a size past the limits) is refused now
        ModelMeta.from_json(vae_meta.to_json(), f"{src} (VAE)")
        ModelMeta.from_json(meta.to_json(), str(src))
        save_model_folder(work / "vae", vae_meta, load_all(vae_state, dtype))
        save_model_folder(work, meta, load_all(unet_state, dtype))
        replace_dir_atomic(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    params = sum(t.numel() for t in unet_state.values())
    return {
        "dst": str(dst),
        "format": got["format"],
        "unet_parameters": params,
        "text_encoder": bool(got["text"]),
        "notes": got["notes"],
    }


# --------------------------------------------------------------------------- export


def _native_parts(
    native: Path,
) -> tuple[ModelMeta, UNetConfig, LazyState, tuple[ModelMeta, LazyState] | None]:
    """A native diffusion folder's meta, U-Net config and lazy weights, and (meta, lazy
    weights) of its VAE where it has one."""
    meta = ModelFolder.read(native).meta
    config = UNetConfig.from_dict(meta.unet)
    state = open_weights(native / MODEL_WEIGHTS)
    vae = None
    if meta.latent is not None:
        vae_dir = native / meta.latent.vae
        vae = (read_model_meta(vae_dir), open_weights(vae_dir / MODEL_WEIGHTS))
    return meta, config, state, vae


def _describe(meta: ModelMeta) -> str:
    """'a latent text-to-image model (MiniLM text encoder)' and the like, for refusals."""
    space = "latent" if meta.latent else "pixel-space"
    task = {"generate": {"text": "text-to-image", "class": "class-conditional"}.get(
        meta.conditioning, "unconditional"), "superres": "super-resolution",
        "inpaint": "inpainting"}[meta.task]  # fmt: skip
    text = (meta.text_encoder or {}).get("type")
    return f"this {space} {task} model" + (f" ({text} text encoder)" if text else "")


def _alternatives(meta: ModelMeta, config: UNetConfig) -> str:
    """Where such a model can go instead."""
    try:
        unet_config_to_diffusers(config, meta.data.resolution)
        scheduler_from_parameterization(meta.parameterization)
    except UserError:
        return "Keep the latentforge model folder itself (copy it): it holds the whole model"
    return (
        "Keep the latentforge model folder itself (copy it), or use --format diffusers "
        "for its U-Net, VAE and scheduler"
    )


def _export_sdxl_text(native: Path, work: Path, text: dict) -> dict:
    """SDXL's text encoders and tokenizers copied out; model_index.json's entries for them:
    StableDiffusionXLPipeline, or StableDiffusionXLImg2ImgPipeline for the refiner (bigG
    alone, aesthetic-score ids), as diffusers saves them."""
    refiner = not text.get("path")
    entries = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline"
        if refiner
        else "StableDiffusionXLPipeline",
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": text.get("force_zeros_for_empty_prompt", True),
    }
    if refiner:
        entries["requires_aesthetics_score"] = text.get("requires_aesthetics_score", False)
    pairs = [("path_2", "text_encoder_2"), ("tokenizer_2", "tokenizer_2")]
    if not refiner:
        pairs += [("path", "text_encoder"), ("tokenizer", "tokenizer")]
    for key, name in pairs:
        shutil.copytree(native / text.get(key, name), work / name)
    return entries


def export_model(native_dir: str | Path, dst: str | Path, fmt: str = "diffusers") -> dict:
    """A native diffusion model folder -> a diffusers folder (fmt "diffusers") that
    `from_pretrained` loads, or one LDM-named `.safetensors` (fmt "single-file").

    Class-conditional U-Nets map their class embedding onto diffusers' `num_class_embeds`
    (num_classes + 1 rows: the last is our null class). U-Nets with self-attention only (our
    pixel / class models) have no diffusers equivalent and are refused.
    """
    if fmt not in ("diffusers", "single-file"):
        raise UserError(f"unknown export format {fmt!r}; use 'diffusers' or 'single-file'")
    native, dst = Path(native_dir), Path(dst)
    meta, config, state, vae = _native_parts(native)
    if meta.guidance_embedding:
        raise UserError(
            f"{native}: {_describe(meta)} embeds its guidance scale (LCM / distilled); it does "
            "not export yet. Keep the latentforge model folder itself (copy it)"
        )
    if fmt == "single-file":
        if dst.suffix != ".safetensors":
            raise UserError(f"single-file export writes a .safetensors file, got {dst}")
        vae_meta = vae[0] if vae else None
        blockers = ldm.single_file_blockers(meta, vae_meta)
        if blockers:
            raise UserError(
                f"{native}: {_describe(meta)} does not fit a Stable Diffusion single file: "
                f"{'; '.join(blockers)}. {_alternatives(meta, config)}"
            )
        text = meta.text_encoder or {}
        text_dir = native / text.get("path", "text_encoder") if text.get("type") == "clip" else None
        notes = ldm.write_single_file(
            dst,
            config,
            load_all(state),
            VAEConfig.from_dict(vae_meta.vae),
            load_all(vae[1]),
            text_dir,
            ldm.single_file_hints(meta, text_dir),
        )
        return {"dst": str(dst), "format": fmt, "notes": notes}
    res = meta.data.resolution
    unet_json = unet_config_to_diffusers(config, res)
    scheduler = scheduler_from_parameterization(
        meta.parameterization, meta.defaults.spacing or "leading"
    )
    text = meta.text_encoder or {}
    notes = []
    work = _fresh_work_dir(dst)
    try:
        save_tensors_atomic(
            work / "unet" / f"{DIFFUSERS_WEIGHTS}.safetensors", load_all(state), {"format": "pt"}
        )
        write_json_atomic(work / "unet" / "config.json", unet_json)
        write_json_atomic(work / "scheduler" / "scheduler_config.json", scheduler)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers_version(),
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }
        if vae is not None:
            vae_config = VAEConfig.from_dict(vae[0].vae)
            vae_json = vae_config_to_diffusers(vae_config, meta.latent.image_resolution)
            vae_json["scaling_factor"] = meta.latent.scaling_factor
            save_tensors_atomic(
                work / "vae" / f"{DIFFUSERS_WEIGHTS}.safetensors",
                load_all(vae[1]),
                {"format": "pt"},
            )
            write_json_atomic(work / "vae" / "config.json", vae_json)
            index["vae"] = ["diffusers", "AutoencoderKL"]
        if text.get("type") == "clip" and vae is not None:
            shutil.copytree(native / text.get("path", "text_encoder"), work / "text_encoder")
            shutil.copytree(native / text.get("tokenizer", "tokenizer"), work / "tokenizer")
            if text.get("clip_skip", 1) != 1:
                notes.append(
                    f"clip_skip={text['clip_skip']} is not stored by diffusers: "
                    "pass clip_skip to the pipeline call"
                )
            index.update(
                {
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "safety_checker": [None, None],
                    "feature_extractor": [None, None],
                    "requires_safety_checker": False,
                }
            )
            write_json_atomic(work / "model_index.json", index)
        elif text.get("type") == "sdxl" and vae is not None:
            index.update(_export_sdxl_text(native, work, text))
            write_json_atomic(work / "model_index.json", index)
        else:
            notes.append(
                "no CLIP text encoder: wrote unet/, vae/, scheduler/ without "
                "model_index.json (load the components one by one)"
            )
        replace_dir_atomic(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"dst": str(dst), "format": fmt, "notes": notes}

"""ControlNet model folders: model.json (kind "controlnet") + model.safetensors, and the
importers and exporter for diffusers `ControlNetModel` folders and the original single files.

A ControlNet folder's model.json has a `controlnet` section: `ControlNetConfig.to_dict()` plus
`base` (what base model it was made for, free text) and `preprocess` (the preprocessor its
training control images went through, e.g. "scribble"). A diffusion model folder names its
default ControlNet with `sampling.controlnet` (a sub-folder, as `latent.vae` names the VAE):
`--control IMAGE` without `--controlnet` uses it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..models.controlnet import ControlNet, ControlNetConfig
from . import ldm
from .checkpoint import (
    MODEL_WEIGHTS,
    PICKLE_SUFFIXES,
    replace_dir_atomic,
    save_tensors_atomic,
    write_json_atomic,
)
from .diffusers_config import (
    diffusers_version,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from .diffusers_format import DIFFUSERS_WEIGHTS, _fresh_work_dir, _read_json, _weights
from .lazy import (
    LazyState,
    check_strict,
    lazy,
    load_all,
    meta_module,
    open_safetensors,
    open_weights,
)
from .model_folder import (
    ModelMeta,
    channels_last,
    read_model_meta,
    save_model_folder,
    unet_guidance,
)

DIFFUSERS_CLASS = "ControlNetModel"
SINGLE_FILE_PREFIX = "control_model."  # the original ControlNet files (cldm)
HINT_BLOCK = "input_hint_block."  # what marks a single file as a ControlNet
PREPROCESSORS = ("canny", "scribble", "sketch")  # guessed from an imported file's name


def controlnet_meta(
    config: ControlNetConfig,
    *,
    preprocess: str = "none",
    base: str | None = None,
    time_cond_proj_dim: int | None = None,
    source: dict | None = None,
    where: str = "ControlNet",
) -> ModelMeta:
    """The model.json of a ControlNet folder (validated as any model.json read back is)."""
    section = {**config.to_dict(), "preprocess": preprocess}
    if base is not None:
        section["base"] = base
    d: dict = {"kind": "controlnet", "controlnet": section, "source": source}
    if time_cond_proj_dim:
        d["guidance_embedding"] = {"time_cond_proj_dim": time_cond_proj_dim}
    return ModelMeta.from_json({k: v for k, v in d.items() if v is not None}, where)


def save_controlnet(
    net: ControlNet, folder: str | Path, *, preprocess: str = "none", base: str | None = None
) -> None:
    """`net` as a ControlNet model folder (weights, then model.json, each written atomically)."""
    meta = controlnet_meta(net.control_config, preprocess=preprocess, base=base,
                           time_cond_proj_dim=net.time_cond_proj_dim)  # fmt: skip
    save_model_folder(folder, meta, net.state_dict())


def controlnet_config(meta: ModelMeta) -> ControlNetConfig:
    """A ControlNet folder's network config (its model.json is already validated)."""
    config = {k: v for k, v in meta.controlnet.items() if k not in ("base", "preprocess")}
    return ControlNetConfig.from_dict(config)


def load_controlnet(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[ControlNet, ModelMeta]:
    """A ControlNet folder -> (the network in eval mode on `device` (None: the CPU), its
    ModelMeta); weights stream from the file, checked strictly. dtype None keeps fp32. Its
    convolutions are channels-last, as a loaded model's (`channels_last`; docs/editing.md)."""
    from .lazy import build_module, open_safetensors

    path = Path(path)
    meta = read_model_meta(path)
    if meta.kind != "controlnet":
        raise UserError(f"{path}: model kind {meta.kind!r} is not a ControlNet")
    config = controlnet_config(meta)
    proj = unet_guidance(meta).get("time_cond_proj_dim")
    state, _ = open_safetensors(path / MODEL_WEIGHTS)
    net = build_module(
        lambda: ControlNet(config, time_cond_proj_dim=proj),
        state,
        f"ControlNet {path}",
        dtype=dtype,
        device=device or "cpu",
    )
    return channels_last(net.eval().requires_grad_(False)), meta


def default_controlnet(model_folder: str | Path, meta: ModelMeta) -> Path | None:
    """The ControlNet folder a diffusion model folder names in `sampling.controlnet`, or None."""
    name = meta.defaults.controlnet
    return None if name is None else Path(model_folder) / name


# --------------------------------------------------------------------------- import


def controlnet_config_from_diffusers(cfg: dict, where: str = "config.json") -> ControlNetConfig:
    """A diffusers `ControlNetModel` config.json -> ControlNetConfig (refusing what we lack)."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: config.json must be a JSON object")
    down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    if not isinstance(down, list | tuple):
        raise UserError(f"{where}: down_block_types must be a list, got {down!r}")
    # a ControlNet has no decoder: the U-Net config it shares is given the mirrored one
    up = [d.replace("Down", "Up") if isinstance(d, str) else d for d in reversed(down)]
    shared = {**cfg, "up_block_types": up, "out_channels": cfg.get("in_channels", 4)}
    unet = unet_config_from_diffusers(shared, where)
    embedding = cfg.get("conditioning_embedding_out_channels", [16, 32, 96, 256])
    section = {
        "unet": unet.to_dict(),
        "conditioning_channels": cfg.get("conditioning_channels", 3),
        "embedding_channels": list(embedding) if isinstance(embedding, list | tuple) else embedding,
        "global_pool": cfg.get("global_pool_conditions", False),
    }
    meta = ModelMeta.from_json({"kind": "controlnet", "controlnet": section}, where)
    return controlnet_config(meta)


def _guess_preprocess(src: Path) -> str:
    name = src.name.lower()
    return next((p for p in PREPROCESSORS if p in name), "none")


def _from_diffusers(src: Path, allow_pickle: bool) -> tuple[ControlNetConfig, LazyState, list]:
    folder = src / "controlnet" if (src / "controlnet" / "config.json").is_file() else src
    if not (folder / "config.json").is_file():
        raise UserError(f"{src}: no config.json (not a diffusers ControlNet folder?)")
    cfg = _read_json(folder / "config.json")
    if cfg.get("_class_name") != DIFFUSERS_CLASS:
        raise UserError(f"{folder} holds a {cfg.get('_class_name')}, not a {DIFFUSERS_CLASS}")
    config = controlnet_config_from_diffusers(cfg, str(folder / "config.json"))
    state = _weights(folder, DIFFUSERS_WEIGHTS, allow_pickle)
    notes = []
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order == "bgr":  # flip the first convolution's input channels once, here
        if config.conditioning_channels != 3:
            raise UserError(f"{folder}: channel order 'bgr' needs 3 conditioning channels")
        key = "controlnet_cond_embedding.conv_in.weight"
        if key in state:
            state = {**state, key: lazy(state[key].load().flip(1))}
        notes.append("channel order bgr: the first convolution was flipped to read RGB")
    elif order != "rgb":
        raise UserError(f"{folder}: controlnet_conditioning_channel_order {order!r} is not rgb/bgr")
    return config, state, notes


def controlnet_ldm_names(config: ControlNetConfig) -> dict[str, str]:
    """Native (= diffusers) ControlNet keys -> the original single file's (without prefix)."""
    with torch.device("meta"):
        keys = list(ControlNet(config).state_dict())
    hint_last = 4 * (len(config.embedding_channels) - 1) + 2  # conv_in, 2 per level, conv_out
    out = {}
    for key in keys:
        head, _, leaf = key.rpartition(".")
        if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))", head):
            i = 0 if m[1] == "conv_in" else hint_last if m[1] == "conv_out" else 2 + 2 * int(m[2])
            out[key] = f"{HINT_BLOCK}{i}.{leaf}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", head):
            out[key] = f"zero_convs.{m[1]}.0.{leaf}"
        elif head == "controlnet_mid_block":
            out[key] = f"middle_block_out.0.{leaf}"
        else:
            out[key] = ldm.unet_key_to_ldm(key, config.unet)
    return out


def _config_from_single_file(shapes: dict, num_heads) -> ControlNetConfig:
    """The config of a single file's (un-prefixed) tensors: the U-Net part as SD's is inferred
    (`ldm.infer_unet_config`), the image encoder's widths from input_hint_block."""
    pattern = re.compile(r"input_hint_block\.(\d+)\.weight")
    hints = sorted(int(m[1]) for k in shapes if (m := pattern.fullmatch(k)))
    if len(hints) < 2 or len(hints) % 2:
        raise UserError(f"not a ControlNet single file: {len(hints)} input_hint_block convolutions")
    first = shapes[f"{HINT_BLOCK}{hints[0]}.weight"]
    # conv_in, then per level a conv and a stride-2 conv (whose width is the next level's)
    widths = [first[0]] + [shapes[f"{HINT_BLOCK}{i}.weight"][0] for i in hints[2:-1:2]]
    parts = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")
    unet_shapes = {k: v for k, v in shapes.items() if k.startswith(parts)}
    # a ControlNet has no output layer; its U-Net config's out_channels is the input's
    c_in = shapes.get("input_blocks.0.0.weight", (0, 0))[1]
    unet_shapes["out.2.weight"] = (c_in, 1, 3, 3)
    unet = ldm._inferred(ldm.infer_unet_config, unet_shapes, "U-Net", lambda c, w: None, num_heads)
    section = {"unet": unet.to_dict(), "conditioning_channels": first[1],
               "embedding_channels": widths}  # fmt: skip
    meta = ModelMeta.from_json({"kind": "controlnet", "controlnet": section}, "ControlNet file")
    return controlnet_config(meta)


def _from_single_file(
    src: Path, allow_pickle: bool, num_heads: int | tuple[int, ...] | None
) -> tuple[ControlNetConfig, LazyState, list]:
    state = open_weights(src, allow_pickle=allow_pickle)
    notes = []
    base = [k for k in state if k.startswith(ldm.UNET_PREFIX)]
    if base:  # ControlNet 1.0 files hold the SD model they were trained with: not ours to keep
        notes.append(f"the file also holds a base model ({len(base)} {ldm.UNET_PREFIX}* "
                     "tensors and its VAE / text encoder): skipped")  # fmt: skip
        state = {k: v for k, v in state.items() if k.startswith(SINGLE_FILE_PREFIX)}
    state = {k.removeprefix(SINGLE_FILE_PREFIX): v for k, v in state.items()}
    config = _config_from_single_file({k: v.shape for k, v in state.items()}, num_heads)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(config).state_dict().items()}
    return config, ldm.rename(state, controlnet_ldm_names(config), shapes), notes


def is_controlnet(src: str | Path, allow_pickle: bool = False) -> bool:
    """Whether `src` is a diffusers ControlNet folder or a ControlNet single file (a pickle is
    only looked into with allow_pickle)."""
    src = Path(src)
    if src.is_dir():
        for folder in (src, src / "controlnet"):
            if (folder / "config.json").is_file():
                return _read_json(folder / "config.json").get("_class_name") == DIFFUSERS_CLASS
        return False
    if not src.is_file() or (src.suffix in PICKLE_SUFFIXES and not allow_pickle):
        return False
    if src.suffix in PICKLE_SUFFIXES:
        keys = open_weights(src, allow_pickle=True)
    else:
        keys = open_safetensors(src)[0]
    return any(HINT_BLOCK in k for k in keys)


def import_controlnet(
    src: str | Path,
    dst: str | Path,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = None,
    num_heads: int | tuple[int, ...] | None = None,
    preprocess: str | None = None,
) -> dict:
    """A diffusers ControlNet folder or an original single file -> a ControlNet folder at `dst`.

    Every key must land on a parameter and every parameter be filled. preprocess: what its
    control images are (default: guessed from the source's name, else "none"); num_heads:
    single files, as for `import_model`. Returns a summary dict."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserError(f"not found: {src}")
    fmt = "single-file" if src.is_file() else "diffusers"
    if fmt == "diffusers":
        config, state, notes = _from_diffusers(src, allow_pickle)
    else:
        config, state, notes = _from_single_file(src, allow_pickle, num_heads)
    what = f"ControlNet from {src}"
    check_strict(meta_module(lambda: ControlNet(config), what), state, what)
    source = {"imported_from": str(src), "format": fmt}
    preprocess = preprocess or _guess_preprocess(src)
    meta = controlnet_meta(config, preprocess=preprocess, source=source, where=str(src))
    work = _fresh_work_dir(dst)
    try:
        save_model_folder(work, meta, load_all(state, dtype))
        replace_dir_atomic(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {
        "dst": str(dst), "format": fmt, "parameters": sum(t.numel() for t in state.values()),
        "preprocess": meta.controlnet["preprocess"], "notes": notes,
    }  # fmt: skip


# --------------------------------------------------------------------------- export


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict:
    """ControlNetConfig -> a diffusers `ControlNetModel` config.json."""
    cfg = unet_config_to_diffusers(config.unet, sample_size=0)
    for key in ("sample_size", "out_channels", "up_block_types", "dropout"):
        cfg.pop(key)
    return {
        **cfg,
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": diffusers_version(),
        "conditioning_channels": config.conditioning_channels,
        "conditioning_embedding_out_channels": list(config.embedding_channels),
        "global_pool_conditions": config.global_pool,
        "controlnet_conditioning_channel_order": "rgb",
    }


def export_controlnet(native_dir: str | Path, dst: str | Path) -> dict:
    """A ControlNet folder -> a diffusers ControlNetModel folder (`from_pretrained` loads it)."""
    native, dst = Path(native_dir), Path(dst)
    meta = read_model_meta(native)
    if meta.kind != "controlnet":
        raise UserError(f"{native}: model kind {meta.kind!r} is not a ControlNet")
    if meta.guidance_embedding:
        raise UserError(f"{native}: this ControlNet embeds a guidance scale, which diffusers' "
                        "ControlNetModel lacks; keep the folder itself")  # fmt: skip
    cfg = controlnet_config_to_diffusers(controlnet_config(meta))
    state = open_weights(native / MODEL_WEIGHTS)
    work = _fresh_work_dir(dst)
    try:
        weights = work / f"{DIFFUSERS_WEIGHTS}.safetensors"
        save_tensors_atomic(weights, load_all(state), {"format": "pt"})
        write_json_atomic(work / "config.json", cfg)
        replace_dir_atomic(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"dst": str(dst), "format": "diffusers", "notes": []}


def controlnet_to_single_file(net: ControlNet) -> dict[str, torch.Tensor]:
    """`net`'s weights under the original single file's names (`control_model.*`)."""
    names = controlnet_ldm_names(net.control_config)
    return {SINGLE_FILE_PREFIX + names[k]: v for k, v in net.state_dict().items()}


def controlnet_folders(folder: str | Path | None) -> dict[str, Path]:
    """The ControlNet folders directly inside `folder`, by name (what a server offers); {} when
    there is no such folder. Sub-folders that are not ControlNets are left out."""
    if folder is None or not Path(folder).is_dir():
        return {}
    found = {}
    for sub in sorted(Path(folder).iterdir()):
        try:
            if sub.is_dir() and read_model_meta(sub).kind == "controlnet":
                found[sub.name] = sub
        except (UserError, OSError):
            continue
    return found

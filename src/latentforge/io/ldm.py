"""Original single-file Stable Diffusion checkpoints (CompVis LDM key names) <-> native names.

One `.safetensors` holds three networks under prefixes: `model.diffusion_model.` (U-Net, openai
guided-diffusion names: input_blocks / middle_block / output_blocks), `first_stage_model.` (the
KL autoencoder, taming-transformers names: down.i.block.j, mid.attn_1, ...) and
`cond_stage_model.` (SD 1.x: a Hugging Face CLIPTextModel under `.transformer.`; SD 2.x: the
OpenCLIP ViT-H text tower under `.model.`). Native names equal diffusers' names, so these maps
also serve diffusers conversions.

Every map is computed key by key from the native module's own state dict (built on the meta
device), so the same rule gives both directions: import (LDM -> native) and export.
The file carries no config: the U-Net and VAE configs are inferred from tensor shapes, the
attention head count from SD's conventions (8 heads in SD 1.x; 64-wide heads in SD 2.x).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import UserError
from ..models.presets import UNetConfig
from ..models.unet import UNet
from ..models.vae import AutoencoderKL, VAEConfig
from ..schedules import alphas_cumprod, get_betas
from .checkpoint import PICKLE_SUFFIXES, save_tensors_atomic
from .lazy import LazyState, LazyTensor, check_strict, load_all, open_safetensors, open_weights
from .model_folder import ModelMeta, check_unet_config, check_vae_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
# SDXL: conditioner.embedders.I.transformer. CLIP ViT-L (HF layout), .I.model. OpenCLIP bigG
_SDXL_TEXT = re.compile(r"conditioner\.embedders\.\d+\.(transformer|model)\.(.+)")
SDXL_PARTS = {"transformer": "xl_clip", "model": "xl_openclip"}
SDXL_SCALING = 0.13025  # SDXL's VAE latent scaling factor (its fp16-fix VAE's too)
EXPECTED = (
    f"a Stable Diffusion single file holds {UNET_PREFIX}* (U-Net), {VAE_PREFIX}* (VAE) and "
    "optionally cond_stage_model.* (CLIP text encoder)"
)
# Safetensors metadata that export writes and import reads (flags override it): Stability's
# ModelSpec keys where one exists, our own for what SD's conventions cannot recover.
HINT_PREDICTION = "modelspec.prediction_type"  # "epsilon" | "v"
HINT_RESOLUTION = "modelspec.resolution"  # "WxH" in pixels
HINT_HEADS = "latentforge.num_heads"  # "8" or one per level, "2,4"
HINT_SCALING = "latentforge.scaling_factor"
HINT_SAMPLING = "latentforge.sampling"  # model.json's sampling section, JSON
HINT_OPENCLIP_CUT = "latentforge.openclip_last_layer_dropped"  # "true": do not drop another
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012}  # fmt: skip

# Training bookkeeping stored beside the networks: the EMA copy (its weights are flattened
# names, `model_ema.diffusion_modelinput_blocks00weight`), the schedule buffers of LatentDiffusion
# and the VAE's GAN loss. No part of any network; `alphas_cumprod` is checked, not loaded.
_BOOKKEEPING = re.compile(
    r"^(model_ema\.|first_stage_model\.loss\.|"
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_alphas_cumprod|"
    r"posterior_\w+|lvlb_weights|logvar)$)"
)
_TEXT_BUFFERS = re.compile(r"(position_ids|attn_mask|logit_scale|text_projection)$")

_RESNET = {  # diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding": "label_emb",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's added text-time embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _split(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    head, _, leaf = key.rpartition(".")
    return head, leaf


def _resnet(rest: str) -> str:
    head, leaf = _split(rest)
    return f"{_RESNET[head]}.{leaf}"


def unet_key_to_ldm(key: str, c: UNetConfig) -> str:
    """One native (= diffusers) U-Net key -> its LDM name (without the prefix)."""
    per = c.layers_per_block + 1  # input/output blocks per level
    head, leaf = _split(key)
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{leaf}"
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
        r"\.(\d+)\.(.+)",
        key,
    )
    if m:
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            if kind == "downsamplers":  # Downsample's conv is called `op`
                return f"input_blocks.{1 + i * per + c.layers_per_block}.0.op.{leaf}"
            idx = 1 + i * per + j
            return (
                f"input_blocks.{idx}.0.{_resnet(rest)}"
                if kind == "resnets"
                else f"input_blocks.{idx}.1.{rest}"
            )
        if kind == "upsamplers":  # after the attention when the level has one
            level = len(c.block_out_channels) - 1 - i
            slot = 2 if c.attention_levels[level] else 1
            return f"output_blocks.{i * per + c.layers_per_block}.{slot}.conv.{leaf}"
        idx = i * per + j
        return (
            f"output_blocks.{idx}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"output_blocks.{idx}.1.{rest}"
        )
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        slot = 0 if m[2] == "0" else (2 if c.mid_attention else 1)
        return f"middle_block.{slot}.{_resnet(m[3])}"
    raise ValueError(f"no LDM name for U-Net key {key!r}")


def vae_key_to_ldm(key: str, c: VAEConfig) -> str:
    """One native (= diffusers) VAE key -> its LDM name (without the prefix)."""
    n = len(c.block_out_channels)
    head, leaf = _split(key)
    side, _, rest = key.partition(".")

    def res(r: str) -> str:
        return r.replace("conv_shortcut", "nin_shortcut")

    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest
    )
    if m:
        i = int(m[2]) if m[1] == "down" else n - 1 - int(m[2])  # LDM counts decoder levels up
        if m[3] == "resnets":
            return f"{side}.{m[1]}.{i}.block.{m[4]}.{res(m[5])}"
        return f"{side}.{m[1]}.{i}.{m[1]}sample.conv.{leaf}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{res(m[2])}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
    if m:
        return f"{side}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
    if head.endswith("conv_norm_out"):
        return f"{side}.norm_out.{leaf}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv


def _meta_shapes(module_factory) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in module_factory().state_dict().items()}


def unet_ldm_names(c: UNetConfig) -> dict[str, str]:
    return {k: unet_key_to_ldm(k, c) for k in _meta_shapes(lambda: UNet(c))}


def vae_ldm_names(c: VAEConfig) -> dict[str, str]:
    return {k: vae_key_to_ldm(k, c) for k in _meta_shapes(lambda: AutoencoderKL(c))}


def _fit(t: LazyTensor, shape: tuple[int, ...]) -> LazyTensor:
    """1x1 conv <-> linear weights (LDM's VAE attention; old SD 2.x proj_in): same numbers."""
    squeeze = tuple(s for s in t.shape if s != 1) == tuple(s for s in shape if s != 1)
    return t.reshape(shape) if t.shape != shape and squeeze else t


def rename(
    state: Mapping[str, LazyTensor], names: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> LazyState:
    """Source-named lazy state -> native names (via native -> source `names`).

    Source keys no rule consumes keep their source names, so the strict check lists them as
    unexpected; native keys the source lacks are listed as missing.
    """
    out: LazyState = {}
    for native, src in names.items():
        if src in state:
            out[native] = _fit(state[src], shapes[native])
    used = set(names.values())
    out.update({k: v for k, v in state.items() if k not in used})
    return out


# --------------------------------------------------------------------------- config inference


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(
    shapes: Mapping[str, tuple[int, ...]],
    num_heads: int | tuple[int, ...] | None = None,
    addition_time_embed_dim: int = 256,
) -> UNetConfig:
    """UNetConfig from un-prefixed LDM U-Net shapes (no config file travels with the weights).
    An SDXL label embedding (label_emb.0) takes `addition_time_embed_dim` (SDXL's 256)."""
    keys = list(shapes)
    if "input_blocks.0.0.weight" not in shapes or "out.2.weight" not in shapes:
        raise UserError("no Stable Diffusion U-Net found (model.diffusion_model.input_blocks.0.0)")
    n_inputs = len(_indices(keys, r"input_blocks\.(\d+)\."))
    downs = [i for i in range(n_inputs) if f"input_blocks.{i}.0.op.weight" in shapes]
    n = len(downs) + 1
    per, rem = divmod(n_inputs, n)  # 1 + n * lpb + (n - 1) input blocks
    if rem or per < 2:
        raise UserError(f"cannot infer the U-Net layout from {n_inputs} input blocks")
    lpb = per - 1
    firsts = [1 + level * per for level in range(n)]
    chans = tuple(shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in firsts)
    attn = tuple(f"input_blocks.{i}.1.norm.weight" in shapes for i in firsts)
    ctx = [s[1] for k, s in shapes.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    linear = bool(proj) and len(proj[0]) == 2
    depth = _depths(keys, firsts, attn)
    cross = ctx[0] if ctx else None
    if num_heads is None:
        # SD 1.x: 8 heads everywhere; SD 2.x (OpenCLIP context, linear projections): 64-d heads
        sd2 = linear or cross == 1024
        num_heads = tuple(max(1, ch // 64) for ch in chans) if sd2 else 8
    label = shapes.get("label_emb.weight")
    added = shapes.get("label_emb.0.0.weight")
    return UNetConfig(
        in_channels=shapes["input_blocks.0.0.weight"][1],
        out_channels=shapes["out.2.weight"][0],
        block_out_channels=chans,
        layers_per_block=lpb,
        attention_levels=attn,
        num_heads=num_heads,
        transformer_depth=depth,
        cross_attention_dim=cross,
        linear_projection=linear,
        num_classes=label[0] - 1 if label else 0,
        norm_groups=32,
        mid_attention="middle_block.1.norm.weight" in shapes,
        addition_time_embed_dim=addition_time_embed_dim if added else 0,
        projection_class_embeddings_input_dim=added[1] if added else 0,
    )


def _depths(keys: list[str], firsts: list[int], attn: tuple[bool, ...]) -> int | tuple[int, ...]:
    """Transformer blocks per level (SDXL: 1, 2, 10): counted in each attention level's first
    input block and the mid block (which uses the last level's); one int when they agree."""
    blocks = r"\.1\.transformer_blocks\.(\d+)\."
    mid = len(_indices(keys, "middle_block" + blocks))
    depths = [
        len(_indices(keys, rf"input_blocks\.{f}{blocks}")) if a else 1
        for f, a in zip(firsts, attn, strict=True)
    ]
    if mid:
        depths[-1] = mid
    used = {d for d, a in zip(depths, attn, strict=True) if a} | ({mid} if mid else set())
    return used.pop() if len(used) == 1 else tuple(depths) if used else 1


def infer_vae_config(
    shapes: Mapping[str, tuple[int, ...]], scaling_factor: float = 0.18215
) -> VAEConfig:
    """VAEConfig from un-prefixed LDM VAE shapes."""
    keys = list(shapes)
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_out.weight" not in shapes:
        raise UserError("no Stable Diffusion VAE found (first_stage_model.encoder.conv_in)")
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1],
        block_out_channels=tuple(
            shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels
        ),
        layers_per_block=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        norm_groups=32,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
        scaling_factor=scaling_factor,
    )


# --------------------------------------------------------------------------- text encoders


def clip_config(state: Mapping[str, LazyTensor], hidden_act: str) -> dict:
    """transformers CLIPTextConfig fields from HF-named text-encoder shapes (64-wide heads)."""
    try:
        return _clip_config(state, hidden_act)
    except (KeyError, IndexError) as e:
        raise UserError(f"the text encoder is not a CLIP text model (no {e})") from None


def _clip_config(state: Mapping[str, LazyTensor], hidden_act: str) -> dict:
    emb = state["text_model.embeddings.token_embedding.weight"].shape
    hidden = emb[1]
    if hidden % 64 and hidden > 64:
        raise UserError(f"text encoder width {hidden} is not a multiple of 64-wide heads")
    return {
        "vocab_size": emb[0],
        "hidden_size": hidden,
        "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[
            0
        ],
        "hidden_act": hidden_act,
    }


_OPENCLIP = (  # OpenCLIP -> HF, applied in order to the part after `transformer.resblocks.i.`
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)


def canonical_clip_names(state: Mapping[str, torch.Tensor | LazyTensor]) -> dict:
    """HF CLIP text keys as SD files and the Hub spell them (`text_model.` prefix); recent
    transformers versions save them without it (and load both)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def openclip_to_hf(state: Mapping[str, LazyTensor], drop_last: bool = True) -> LazyState:
    """SD 2.x OpenCLIP text tower (un-prefixed) -> HF CLIPTextModel names.

    SD 2.x conditions on the penultimate layer (then ln_final), so the last resblock is dropped:
    the HF model's last_hidden_state is then exactly SD 2.x's context. Our own exports have
    dropped it already (drop_last=False).
    """
    blocks = _indices(state, r"transformer\.resblocks\.(\d+)\.")
    last = blocks[-1] if blocks and drop_last else -1
    out: LazyState = {}
    for key, t in state.items():
        if key.startswith(f"transformer.resblocks.{last}.") or _TEXT_BUFFERS.search(key):
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = t
        elif key.startswith("ln_final."):
            out[f"text_model.final_layer_norm.{_split(key)[1]}"] = t
        elif m and m[2].startswith("attn.in_proj_"):  # fused q, k, v rows
            base, leaf = f"text_model.encoder.layers.{m[1]}.self_attn", m[2].rsplit("_", 1)[1]
            d = t.shape[0] // 3
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{base}.{name}.{leaf}"] = t.slice0(i * d, (i + 1) * d)
        elif m:
            rest = m[2]
            for old, new in _OPENCLIP:
                rest = rest.replace(old, new)
            out[f"text_model.encoder.layers.{m[1]}.{rest}"] = t
        else:
            out[key] = t  # unexpected: the strict check will name it
    return out


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of `openclip_to_hf` (without the dropped last layer): for tests and export."""
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key.startswith("text_model.final_layer_norm."):
            out[f"ln_final.{_split(key)[1]}"] = t
        elif m and re.fullmatch(r"self_attn\.[qkv]_proj\.\w+", m[2]):
            leaf = _split(m[2])[1]
            if m[2].startswith("self_attn.q_proj"):
                parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{leaf}"] = torch.cat(parts)
        elif m:
            rest = m[2]
            for old, new in _OPENCLIP:
                rest = rest.replace(new, old)
            out[f"transformer.resblocks.{m[1]}.{rest}"] = t
    return out


# --------------------------------------------------------------------------- whole checkpoints


def split_checkpoint(state: Mapping[str, LazyTensor]) -> dict[str, LazyState]:
    """Group a single-file checkpoint's keys by network, prefixes removed.

    Returns {"unet", "vae", "clip" | "openclip" (SDXL: "xl_clip", "xl_openclip"),
    "bookkeeping"}; keys under no known prefix make
    a one-line error naming the first few (strict: nothing is silently dropped).
    """
    parts: dict[str, LazyState] = {"unet": {}, "vae": {}, "bookkeeping": {}}
    unknown = []
    for key, t in state.items():
        if _BOOKKEEPING.match(key):
            parts["bookkeeping"][key] = t
            continue
        if m := _SDXL_TEXT.fullmatch(key):
            parts.setdefault(SDXL_PARTS[m[1]], {})[m[2]] = t
            continue
        for part, prefix in (
            ("unet", UNET_PREFIX),
            ("vae", VAE_PREFIX),
            ("clip", CLIP_PREFIX),
            ("openclip", OPENCLIP_PREFIX),
        ):
            if key.startswith(prefix):
                parts.setdefault(part, {})[key[len(prefix) :]] = t
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserError(
            f"unexpected keys in the checkpoint: {', '.join(unknown[:5])}{more}; {EXPECTED}"
        )
    if not parts["unet"]:
        raise UserError(f"no U-Net weights: not a Stable Diffusion checkpoint; {EXPECTED}")
    return parts


def to_ldm(
    unet_config: UNetConfig,
    unet: Mapping[str, torch.Tensor],
    vae_config: VAEConfig | None = None,
    vae: Mapping[str, torch.Tensor] | None = None,
    text: Mapping[str, torch.Tensor] | None = None,
    *,
    openclip: bool = False,
) -> dict[str, torch.Tensor]:
    """Native state dicts -> one LDM-named state dict (a single-file checkpoint's contents).

    `text` is an HF CLIPTextModel state dict, written under SD 1.x's prefix, or with
    openclip=True in SD 2.x's OpenCLIP layout (without the last, unused resblock).
    """
    out = {UNET_PREFIX + unet_key_to_ldm(k, unet_config): v for k, v in unet.items()}
    if vae is not None and vae_config is not None:
        for k, v in vae.items():
            name = vae_key_to_ldm(k, vae_config)
            if ".mid.attn_1." in name and v.ndim == 2:  # LDM's attention uses 1x1 convs
                v = v[:, :, None, None]
            out[VAE_PREFIX + name] = v
    if text is not None:
        if openclip:
            out.update({OPENCLIP_PREFIX + k: v for k, v in hf_to_openclip(text).items()})
        else:
            out.update({CLIP_PREFIX + k: v for k, v in text.items()})
    return out


# --------------------------------------------------------------------------- import / export


def _inferred(infer: Callable, shapes: Mapping, what: str, check: Callable, *args):
    """infer(shapes, *args), checked: shapes no SD network has are one line naming the gap."""
    try:
        config = infer(shapes, *args)
    except UserError as e:
        raise UserError(f"not a Stable Diffusion single file: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UserError(
            f"not a Stable Diffusion single file: cannot infer the {what} layout "
            f"({type(e).__name__}: {str(e)[:80]}); {EXPECTED}"
        ) from None
    check(config, f"not a Stable Diffusion single file: the {what} inferred from it")
    return config


def unet_from_checkpoint(
    parts: Mapping[str, LazyState], num_heads: int | tuple[int, ...] | None = None
) -> tuple[UNetConfig, LazyState]:
    """(inferred config, native-named lazy state) of a split checkpoint's U-Net."""
    unet = parts["unet"]
    shapes = {k: v.shape for k, v in unet.items()}
    args = (num_heads, _sdxl_time_dim(parts, shapes))
    config = _inferred(infer_unet_config, shapes, "U-Net", check_unet_config, *args)
    return config, rename(unet, unet_ldm_names(config), _meta_shapes(lambda: UNet(config)))


def _sdxl_time_dim(parts: Mapping[str, LazyState], shapes: Mapping) -> int:
    """The width of each SDXL time id's features: what the added embedding's input holds
    beside bigG's pooled output, over 6 ids (base: sizes, crop) or 5 (refiner: bigG alone,
    sizes, crop, aesthetic score); SDXL's 256 when the file holds no text projection."""
    added, proj = shapes.get("label_emb.0.0.weight"), parts.get("xl_openclip", {})
    if not added or "text_projection" not in proj:
        return 256
    ids = 6 if "xl_clip" in parts else 5
    width, rem = divmod(added[1] - proj["text_projection"].shape[1], ids)
    return width if width > 0 and not rem else 256


def sdxl_text_to_ldm(
    clip: Mapping[str, torch.Tensor] | None, bigg: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """SDXL's text encoders (HF CLIPTextModel, CLIPTextModelWithProjection state dicts) ->
    single-file keys: CLIP-L as embedder 0 in HF layout, bigG in OpenCLIP layout after it
    (the refiner: bigG alone, embedder 0), its projection as OpenCLIP's (width, proj) matrix."""
    out, i = {}, 0
    if clip is not None:
        clip = canonical_clip_names(clip)
        out = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()}
        i = 1
    tower = canonical_clip_names({k: v for k, v in bigg.items() if k != "text_projection.weight"})
    tower = {**hf_to_openclip(tower), "text_projection": bigg["text_projection.weight"].T}
    out.update({f"conditioner.embedders.{i}.model.{k}": v for k, v in tower.items()})
    return out


def vae_from_checkpoint(
    parts: Mapping[str, LazyState], scaling_factor: float = 0.18215
) -> tuple[VAEConfig, LazyState]:
    if not parts.get("vae"):
        raise UserError(f"no VAE weights ({VAE_PREFIX}*) in the checkpoint")
    vae = parts["vae"]
    shapes = {k: v.shape for k, v in vae.items()}
    config = _inferred(infer_vae_config, shapes, "VAE", check_vae_config, scaling_factor)
    return config, rename(vae, vae_ldm_names(config), _meta_shapes(lambda: AutoencoderKL(config)))


def _write_clip(text: LazyState, hidden_act: str, dst: Path, dtype, projection: int = 0) -> None:
    """An HF-named CLIP text state -> a transformers folder (config.json + model.safetensors);
    projection > 0: a CLIPTextModelWithProjection of that width (SDXL's bigG), pooling at the
    highest token id as OpenCLIP does (transformers' rule for eos_token_id 2, the ids of the
    SDXL release's config)."""
    from ..models.text import _transformers

    tf = _transformers()
    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1} if projection else {}
    config = tf.CLIPTextConfig(
        **clip_config(text, hidden_act), projection_dim=projection or 512, **ids
    )
    with torch.device("meta"):
        model = (tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel)(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        holder = torch.nn.Module()  # newer transformers drop the prefix from their own names
        holder.text_model = model
        model = holder
    text = {k: v for k, v in text.items() if not _TEXT_BUFFERS.search(k)}
    check_strict(model, text, "text encoder")
    dst.mkdir(parents=True)
    config.save_pretrained(dst)
    save_tensors_atomic(dst / "model.safetensors", load_all(text, dtype), {"format": "pt"})


def _check_schedule(bookkeeping: LazyState, spec: dict) -> None:
    """LDM checkpoints store alphas_cumprod: it must be the schedule we are about to use."""
    if "alphas_cumprod" not in bookkeeping:
        return
    stored = bookkeeping["alphas_cumprod"].load().double().flatten()
    betas = get_betas(
        spec["beta_schedule"], len(stored), beta_start=spec["beta_start"], beta_end=spec["beta_end"]
    )
    if not torch.allclose(stored, alphas_cumprod(betas), rtol=1e-4, atol=1e-6):
        raise UserError(
            "the checkpoint's alphas_cumprod is not SD's scaled_linear schedule "
            "(0.00085..0.012): import it from a diffusers folder instead"
        )


def _hints(meta: Mapping[str, str], src: Path) -> dict:
    """Import settings from a single file's metadata (our exports write them); {} for none."""
    out: dict = {}
    try:
        if HINT_PREDICTION in meta:
            out["prediction"] = {"epsilon": "eps", "v": "v"}[meta[HINT_PREDICTION]]
        if HINT_RESOLUTION in meta:
            w, h = (int(v) for v in meta[HINT_RESOLUTION].split("x"))
            out["image_size"] = w if w == h else None
        if HINT_HEADS in meta:
            heads = tuple(int(v) for v in meta[HINT_HEADS].split(","))
            out["num_heads"] = heads[0] if len(set(heads)) == 1 else heads
        if HINT_SCALING in meta:
            out["scaling_factor"] = float(meta[HINT_SCALING])
        if HINT_SAMPLING in meta:
            out["sampling"] = json.loads(meta[HINT_SAMPLING])
            if not isinstance(out["sampling"], dict):
                raise ValueError("sampling")
    except (KeyError, ValueError, RecursionError):
        raise UserError(
            f"{src}: unreadable import hints in its metadata ({sorted(meta)})"
        ) from None
    out["openclip_cut"] = meta.get(HINT_OPENCLIP_CUT) == "true"
    return {k: v for k, v in out.items() if v is not None}


def read_single_file(src: Path, work: Path, opts: dict) -> dict:
    """A single-file checkpoint -> the parts `import_model` writes (text encoder into `work`).

    Flags (`opts`) win over the file's own hints (`_hints`), which win over SD's conventions."""
    if src.suffix in PICKLE_SUFFIXES:
        state, hints = open_weights(src, allow_pickle=opts["allow_pickle"]), {}
    else:
        state, metadata = open_safetensors(src)
        hints = _hints(metadata, src)
    opts = {**hints, **{k: v for k, v in opts.items() if v is not None}}
    parts = split_checkpoint(state)
    unet_config, unet_state = unet_from_checkpoint(parts, opts.get("num_heads"))
    sdxl = bool(unet_config.addition_time_embed_dim)
    scaling = opts.get("scaling_factor", SDXL_SCALING if sdxl else 0.18215)
    vae_config, vae_state = vae_from_checkpoint(parts, scaling)
    with torch.device("meta"):
        check_strict(UNet(unet_config), unet_state, f"U-Net from {src}")
        check_strict(AutoencoderKL(vae_config), vae_state, f"VAE from {src}")
    sd2 = unet_config.cross_attention_dim == 1024  # OpenCLIP-H context: SD 2.x
    prediction = opts.get("prediction") or ("v" if sd2 else "eps")
    image_size = opts.get("image_size") or (768 if sd2 else 1024 if sdxl else 512)
    if image_size % vae_config.downsample_factor:
        raise UserError(f"image size {image_size} is not a multiple of the VAE's factor "
                        f"{vae_config.downsample_factor}")  # fmt: skip
    spec = {"type": "vp", "prediction": prediction, **SD_SCHEDULE, "zero_terminal_snr": False,
            "clip_denoised": None}  # fmt: skip
    _check_schedule(parts["bookkeeping"], spec)
    notes = []
    if not {"prediction", "image_size"} <= set(hints):
        notes.append(
            f"single file: assumed {prediction}-prediction at {image_size}px "
            "(override with --prediction / --image-size)"
        )
    if any(k.startswith("model_ema.") for k in parts["bookkeeping"]):
        notes.append(
            "the checkpoint also holds EMA weights (model_ema.*): the plain ones were used"
        )
    text = None
    if sdxl:
        text = _sdxl_single_file_text(parts, work, opts, notes)
    elif "clip" in parts or "openclip" in parts:
        if "clip" in parts:  # SD 1.x: CLIP ViT-L/14 in HF layout
            state, act = canonical_clip_names(parts["clip"]), "quick_gelu"
        else:  # SD 2.x: OpenCLIP ViT-H/14, penultimate layer
            state, act = openclip_to_hf(parts["openclip"], not opts.get("openclip_cut")), "gelu"
        _write_clip(state, act, work / "text_encoder", opts.get("dtype"))
        text = {"type": "clip", "path": "text_encoder", "tokenizer": "tokenizer", "clip_skip": 1}
        if opts.get("tokenizer"):
            shutil.copytree(opts["tokenizer"], work / "tokenizer")
        else:
            notes.append(
                "a single file holds no tokenizer: copy a CLIP tokenizer folder to "
                "DST/tokenizer (or pass --tokenizer DIR)"
            )
    return {
        "unet": (unet_config, unet_state),
        "vae": (vae_config, vae_state),
        "spec": spec,
        "sample_size": image_size // vae_config.downsample_factor,
        "spacing": "leading",
        "sampling": opts.get("sampling"),
        "text": text,
        "notes": notes,
        "format": "single-file",
    }


def _sdxl_single_file_text(
    parts: Mapping[str, LazyState], work: Path, opts: dict, notes: list[str]
) -> dict:
    """SDXL's text encoders out of a single file into transformers folders (CLIP-L, if any, as
    it is; bigG from OpenCLIP names with all its layers, whose penultimate states SDXL reads,
    and its projection); the tokenizers from --tokenizer DIR's tokenizer/ and tokenizer_2/.
    Returns the model folder's text_encoder block."""
    if "xl_openclip" not in parts:
        raise UserError("an SDXL single file without its OpenCLIP bigG text encoder "
                        "(conditioner.embedders.*.model.*)")  # fmt: skip
    bigg = openclip_to_hf(parts["xl_openclip"], drop_last=False)
    proj = parts["xl_openclip"].get("text_projection")
    if proj is None:
        raise UserError("the SDXL single file's bigG text encoder has no text_projection")
    read = proj.read
    bigg["text_projection.weight"] = LazyTensor(
        lambda: read().T.contiguous(), (proj.shape[1], proj.shape[0]), proj.dtype
    )  # OpenCLIP's x @ P is HF's Linear with weight P.T
    refiner = "xl_clip" not in parts
    text = {
        "type": "sdxl",
        "path_2": "text_encoder_2",
        "tokenizer_2": "tokenizer_2",
        "force_zeros_for_empty_prompt": not refiner,
        "requires_aesthetics_score": refiner,
    }
    if not refiner:
        clip = canonical_clip_names(parts["xl_clip"])
        _write_clip(clip, "quick_gelu", work / "text_encoder", opts.get("dtype"))
        text |= {"path": "text_encoder", "tokenizer": "tokenizer"}
    _write_clip(bigg, "gelu", work / "text_encoder_2", opts.get("dtype"), proj.shape[1])
    tok = Path(opts["tokenizer"]) if opts.get("tokenizer") else None
    names = ["tokenizer_2"] if refiner else ["tokenizer", "tokenizer_2"]
    if tok is not None and all((tok / n).is_dir() for n in names):
        for n in names:
            shutil.copytree(tok / n, work / n)
    else:
        notes.append(
            f"an SDXL single file holds no tokenizers: copy {' and '.join(names)} folders to "
            "DST (or pass --tokenizer DIR holding them, e.g. an SDXL diffusers folder)"
        )
    return text


def single_file_blockers(meta: ModelMeta, vae: ModelMeta | None) -> list[str]:
    """What of a native model an SD single file cannot hold (import infers SD's conventions
    from tensor shapes): each a short phrase; [] when export + import give the model back."""
    out = []
    if vae is None:
        out.append("it has no VAE, where a single file holds a latent model")
    if meta.task != "generate":
        out.append(f"its U-Net takes concatenated images (task {meta.task})")
    text = meta.text_encoder or {}
    if text and text.get("type") != "clip":
        out.append(f"a {text.get('type')} text encoder, where single files hold CLIP")
    if text.get("clip_skip", 1) != 1 or text.get("use_mask"):
        out.append("clip_skip or use_mask settings, which a single file does not record")
    p = meta.parameterization or {}
    schedule = {k: p.get(k, SD_SCHEDULE[k]) for k in SD_SCHEDULE}
    if p.get("type", "vp") != "vp" or schedule != SD_SCHEDULE or p.get("zero_terminal_snr"):
        out.append(
            f"a {p.get('beta_schedule', p.get('type'))} schedule, where a single file implies "
            "SD's scaled_linear 0.00085..0.012 over 1000 steps"
        )
    if p.get("prediction", "eps") not in ("eps", "v"):
        out.append(f"{p.get('prediction')}-prediction, where single files are eps or v")
    c = UNetConfig.from_dict(meta.unet)
    groups = {c.norm_groups} | ({VAEConfig.from_dict(vae.vae).norm_groups} if vae else set())
    if groups != {32}:
        out.append(f"group norms of {min(groups)} groups, where import assumes SD's 32")
    if c.position_embedding or c.context_refiner:
        out.append("a learned position map or a context refiner, which have no LDM names")
    if (c.flip_sin_to_cos, c.freq_shift) != (True, 0):
        out.append("a timestep embedding other than SD's")
    return out


def single_file_hints(meta: ModelMeta, text_dir: Path | None) -> dict[str, str]:
    """The metadata `_hints` reads back: what SD's conventions would otherwise guess."""
    c = UNetConfig.from_dict(meta.unet)
    size = meta.latent.image_resolution
    hints = {
        HINT_PREDICTION: {"eps": "epsilon", "v": "v"}[
            meta.parameterization.get("prediction", "eps")
        ],
        HINT_RESOLUTION: f"{size}x{size}",
        HINT_HEADS: ",".join(str(c.heads_at(i)) for i in range(len(c.block_out_channels))),
        HINT_SCALING: repr(meta.latent.scaling_factor),
        HINT_SAMPLING: json.dumps(meta.defaults.to_json()),
    }
    if text_dir is not None:
        hints[HINT_OPENCLIP_CUT] = "true"
    return hints


def write_single_file(
    dst: Path,
    unet_config: UNetConfig,
    unet: Mapping[str, torch.Tensor],
    vae_config: VAEConfig | None,
    vae: Mapping[str, torch.Tensor] | None,
    text_dir: Path | None,
    hints: Mapping[str, str] | None = None,
) -> list[str]:
    """Native parts -> one LDM-named .safetensors (`hints` into its metadata); returns notes."""
    text, openclip, notes = None, False, []
    if text_dir is not None:
        act = json.loads((text_dir / "config.json").read_text()).get("hidden_act", "quick_gelu")
        state = open_weights(text_dir / "model.safetensors")
        text = canonical_clip_names(load_all(state))
        text = {k: v for k, v in text.items() if not _TEXT_BUFFERS.search(k)}
        openclip = act != "quick_gelu"
        if openclip:
            notes.append(
                "text encoder written in OpenCLIP layout without SD 2.x's unused last resblock"
            )
    out = to_ldm(unet_config, unet, vae_config, vae, text, openclip=openclip)
    save_tensors_atomic(dst, out, {"format": "pt", **(hints or {})})
    return notes

"""diffusers config.json <-> latentforge configs: U-Net, VAE and scheduler (parameterization).

Only configs are translated here (weights keep their names: native = diffusers). Features that
latentforge's networks do not implement are refused by name, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.presets import UNetConfig
from ..models.vae import VAEConfig
from .model_folder import check_unet_config, check_vae_config

# diffusers UNet2DConditionModel options latentforge's U-Net does not implement: the value(s)
# that mean "feature off". Anything else is refused by name.
_UNET_OFF = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),  # text_time: SDXL's (see _added_embedding)
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1.0,),
}
_VAE_OFF = {
    "act_fn": ("silu",),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "shift_factor": (None, 0.0),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_HINTS = {
    "addition_embed_type": " (only SDXL's 'text_time' added embedding)",
    "class_embed_type": " (only plain num_class_embeds maps onto latentforge's class embedding)",
}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def _refuse_features(cfg: dict, off: dict, what: str) -> None:
    for key, allowed in off.items():
        value = cfg.get(key, allowed[0])
        values = value if isinstance(value, list) else [value]
        if any(v not in allowed for v in values):
            raise UserError(f"{what}: {key}={value!r} is not supported{_HINTS.get(key, '')}")


def _uniform(value, what: str, n: int):
    """An int, or a per-level list that latentforge can only take when all entries agree."""
    if not isinstance(value, list | tuple):
        return value
    if len(value) != n or len(set(map(str, value))) != 1:
        raise UserError(f"per-level {what} {list(value)} is not supported (one value only)")
    return value[0]


def _translated(build: Callable[[dict], Any], cfg: Any, where: str, check: Callable) -> Any:
    """build(cfg), then every field ranged (`check`): a config.json of the wrong shape (`[]`,
    a string where a list belongs) is one line naming the file, never a traceback."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: config.json must be a JSON object, got {type(cfg).__name__}")
    try:
        config = build(cfg)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"{where}: config.json has a value of the wrong kind ({e})") from None
    check(config, where)
    return config


# --------------------------------------------------------------------------- configs


def unet_config_from_diffusers(cfg: dict, where: str | Path = "config.json") -> UNetConfig:
    """diffusers UNet2DConditionModel config.json -> UNetConfig (refusing what we lack)."""
    return _translated(_unet_from_diffusers, cfg, str(where), check_unet_config)


def _unet_from_diffusers(cfg: dict) -> UNetConfig:
    _refuse_features(cfg, _UNET_OFF, "U-Net")
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(d not in kinds for d in down):
        raise UserError(f"U-Net down blocks {down} are not supported; use {sorted(kinds)}")
    attention = tuple(kinds[d] for d in down)
    mirror = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != mirror:
        raise UserError(f"U-Net up blocks {up} do not mirror the down blocks (expected {mirror})")
    n = len(down)
    # diffusers' historical naming: for SD, `attention_head_dim` holds the number of heads.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if isinstance(heads, list | tuple):
        if len(heads) != n:
            raise UserError(f"attention heads {heads} need one entry per level ({n})")
        heads = tuple(heads) if len(set(heads)) > 1 else heads[0]
    cross = _uniform(cfg.get("cross_attention_dim", 1280), "cross_attention_dim", n)
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, list | tuple):
        if len(depth) != n or any(isinstance(d, list | tuple) for d in depth):
            raise UserError(f"transformer_layers_per_block {depth} needs one integer per level")
        depth = tuple(depth) if len(set(depth)) > 1 else depth[0]
    # the up blocks mirror the down blocks' depths (diffusers' default when this is None)
    reverse = cfg.get("reverse_transformer_layers_per_block")
    if reverse is not None and reverse != _levels(depth, n)[::-1]:
        raise UserError(
            f"reverse_transformer_layers_per_block={reverse!r} is not supported (only the "
            "down blocks' depths mirrored)"
        )
    num_class_embeds = cfg.get("num_class_embeds")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=_uniform(cfg.get("layers_per_block", 2), "layers_per_block", n),
        attention_levels=attention,
        num_heads=heads,
        transformer_depth=depth,
        cross_attention_dim=cross,
        linear_projection=bool(cfg.get("use_linear_projection", False)),
        # diffusers' class embedding has no null row of its own: its last class serves as ours
        num_classes=num_class_embeds - 1 if num_class_embeds else 0,
        norm_groups=cfg.get("norm_num_groups", 32),
        dropout=cfg.get("dropout", 0.0),
        mid_attention=True,
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        **_added_embedding(cfg),
    )


def _levels(value, n: int) -> list:
    return list(value) if isinstance(value, tuple) else [value] * n


def _added_embedding(cfg: dict) -> dict:
    """SDXL's text-time embedding fields (zero for U-Nets without one)."""
    if cfg.get("addition_embed_type") != "text_time":
        if cfg.get("projection_class_embeddings_input_dim") is not None:
            raise UserError(
                "projection_class_embeddings_input_dim without addition_embed_type 'text_time' "
                "is not supported"
            )
        return {}
    time_dim, width = (
        cfg.get("addition_time_embed_dim"),
        cfg.get("projection_class_embeddings_input_dim"),
    )
    for key, value in (("addition_time_embed_dim", time_dim),
                       ("projection_class_embeddings_input_dim", width)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(
                f"SDXL's addition_embed_type 'text_time' needs an integer {key}, got {value!r}"
            )
    return {"addition_time_embed_dim": time_dim, "projection_class_embeddings_input_dim": width}


def unet_config_to_diffusers(c: UNetConfig, sample_size: int) -> dict:
    """UNetConfig -> diffusers UNet2DConditionModel config (only what diffusers can express)."""
    if c.cross_attention_dim is None:
        raise UserError(
            "diffusers' UNet2DConditionModel needs cross-attention in every attention block; "
            "this U-Net has self-attention only (a pixel / class model): not exportable"
        )
    if c.position_embedding or c.context_refiner:
        raise UserError(
            "this U-Net has a learned position map or a context refiner, which diffusers' "
            "UNet2DConditionModel lacks: not exportable"
        )
    if not c.mid_attention:
        raise UserError("a U-Net without mid-block attention has no diffusers equivalent")
    if any(ch % c.norm_groups for ch in c.block_out_channels):
        raise UserError(
            f"channels {c.block_out_channels} are not multiples of the "
            f"{c.norm_groups} norm groups diffusers uses everywhere"
        )
    heads = list(c.num_heads) if isinstance(c.num_heads, tuple) else c.num_heads
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": diffusers_version(),
        "sample_size": sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "down_block_types": [
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": heads,  # = number of heads (diffusers' naming, see above)
        "cross_attention_dim": c.cross_attention_dim,
        "transformer_layers_per_block": (
            list(c.transformer_depth)
            if isinstance(c.transformer_depth, tuple)
            else c.transformer_depth
        ),
        "use_linear_projection": c.linear_projection,
        "norm_num_groups": c.norm_groups,
        "norm_eps": 1e-5,
        "dropout": c.dropout,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "num_class_embeds": c.num_classes + 1 if c.num_classes else None,
        "act_fn": "silu",
        **(
            {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": c.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": c.projection_class_embeddings_input_dim,
            }
            if c.addition_time_embed_dim
            else {}
        ),
    }


def vae_config_from_diffusers(cfg: dict, where: str | Path = "config.json") -> VAEConfig:
    """diffusers AutoencoderKL config.json -> VAEConfig (refusing what we lack)."""
    return _translated(_vae_from_diffusers, cfg, str(where), check_vae_config)


def _vae_from_diffusers(cfg: dict) -> VAEConfig:
    _refuse_features(cfg, _VAE_OFF, "VAE")
    for key, kind in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        if any(b != kind for b in cfg.get(key, [kind])):
            raise UserError(f"VAE {key} {cfg[key]} are not supported; only {kind}")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=cfg.get("layers_per_block", 1),
        norm_groups=cfg.get("norm_num_groups", 32),
        mid_attention=cfg.get("mid_block_add_attention", True),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def vae_config_to_diffusers(c: VAEConfig, sample_size: int) -> dict:
    if any(ch % c.norm_groups for ch in c.block_out_channels):
        raise UserError(
            f"VAE channels {c.block_out_channels} are not multiples of {c.norm_groups} norm groups"
        )
    n = len(c.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": diffusers_version(),
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "latent_channels": c.latent_channels,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": c.norm_groups,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": c.scaling_factor,
        "mid_block_add_attention": c.mid_attention,
    }


def parameterization_from_scheduler(cfg: dict) -> dict:
    """A diffusers scheduler config -> our `parameterization` spec (make_denoiser's input)."""
    if cfg.get("trained_betas") is not None:
        raise UserError("scheduler: trained_betas (an explicit beta table) is not supported")
    pred, betas = cfg.get("prediction_type", "epsilon"), cfg.get("beta_schedule", "linear")
    if pred not in _PREDICTIONS:
        raise UserError(
            f"scheduler: prediction_type {pred!r} is not supported; "
            f"use one of {sorted(_PREDICTIONS)}"
        )
    if betas not in _BETAS:
        raise UserError(
            f"scheduler: beta_schedule {betas!r} is not supported; use one of {sorted(_BETAS)}"
        )
    spec = {
        "type": "vp",
        "prediction": _PREDICTIONS[pred],
        "beta_schedule": _BETAS[betas],
        "num_timesteps": cfg.get("num_train_timesteps", 1000),
        "zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False)),
        "clip_denoised": None,
    }
    if betas != "squaredcos_cap_v2":
        spec["beta_start"] = cfg.get("beta_start", 0.0001)
        spec["beta_end"] = cfg.get("beta_end", 0.02)
    return spec


# LatentConsistencyModelPipeline's default guidance_scale (embedded, one pass a step)
LCM_GUIDANCE = 8.5


def guidance_embedding_from_diffusers(cfg: dict) -> dict | None:
    """A U-Net config.json's `time_cond_proj_dim` (LCM) -> model.json's guidance_embedding."""
    dim = cfg.get("time_cond_proj_dim")
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise UserError(f"U-Net: time_cond_proj_dim must be an even integer, got {dim!r}")
    return {"time_cond_proj_dim": dim, "guidance": LCM_GUIDANCE}


def consistency_from_scheduler(cfg: dict) -> dict | None:
    """An LCMScheduler config -> parameterization.consistency (its boundary-condition scalings);
    None for other schedulers."""
    if cfg.get("_class_name") != "LCMScheduler":
        return None
    return {"sigma_data": 0.5, "timestep_scaling": float(cfg.get("timestep_scaling", 10.0))}


def scheduler_from_parameterization(spec: dict, spacing: str = "leading") -> dict:
    """Our parameterization -> a DDIMScheduler config.json (the same training schedule)."""
    if spec.get("type", "vp") != "vp":
        raise UserError(
            f"parameterization {spec.get('type')!r} has no diffusers scheduler; "
            "only discrete VP (DDPM-style) models export"
        )
    schedule = spec.get("beta_schedule", "linear")
    defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}.get(schedule, (0, 0))
    names = {v: k for k, v in _BETAS.items()}
    spacing = spacing if spacing in ("leading", "trailing", "linspace") else "leading"
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": diffusers_version(),
        "num_train_timesteps": spec.get("num_timesteps", 1000),
        "beta_schedule": names[schedule],
        "beta_start": spec.get("beta_start") or defaults[0],
        "beta_end": spec.get("beta_end") or defaults[1],
        "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[spec.get("prediction", "eps")],
        "rescale_betas_zero_snr": bool(spec.get("zero_terminal_snr", False)),
        "timestep_spacing": spacing,
        "steps_offset": 1 if spacing == "leading" else 0,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"

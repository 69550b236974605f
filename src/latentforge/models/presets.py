"""Typed network configs and the name -> config registry (frozen dataclasses, no run-time exec)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the U-Net's architecture (and nothing about noise or training)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_heads: int | tuple[int, ...] = 2  # per level when a tuple (SD 2.x), else everywhere
    transformer_depth: int | tuple[int, ...] = 1  # per level when a tuple (SDXL), else everywhere
    cross_attention_dim: int | None = None  # None: self-attention only (no text)
    linear_projection: bool = False  # SD 2.x projects in/out of attention with Linear
    num_classes: int = 0  # > 0: learned class embedding with one extra null class
    norm_groups: int = 32
    dropout: float = 0.0
    mid_attention: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    # > 0: a learned position map (channels x N x N) added after conv_in, so attention and
    # convolutions know where they are (resized bilinearly for other input sizes); 0: none.
    position_embedding: int = 0
    # > 0: that many trainable transformer layers (width context_refiner_width, self-attention
    # over the text tokens) between the frozen text encoder and cross-attention, added back to
    # the tokens residually (zero-initialised, so a new refiner starts as the identity). A
    # frozen encoder's tokens barely carry their phrase ("circle" is the same vector whatever
    # its colour); the refiner lets "red" reach the "circle" and "top left" of its own object,
    # which is what binds attributes to objects. 0: the encoder's tokens as they are.
    context_refiner: int = 0
    context_refiner_width: int = 128
    # SDXL's added conditioning (diffusers' addition_embed_type "text_time", Podell et al.
    # 2023): > 0 adds `add_embedding`, an MLP from the pooled text embedding concatenated with
    # sinusoidal features (addition_time_embed_dim wide each) of the size / crop (/ aesthetic
    # score) ids, added to the time embedding. projection_class_embeddings_input_dim is the MLP's
    # input width: pooled width + ids x addition_time_embed_dim (SDXL: 1280 + 6 x 256 = 2816).
    addition_time_embed_dim: int = 0
    projection_class_embeddings_input_dim: int = 0

    def depth_at(self, level: int) -> int:
        """Transformer blocks per attention layer at `level` (the mid block uses the last)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[level]

    def heads_at(self, level: int) -> int:
        if isinstance(self.num_heads, int):
            return self.num_heads
        return self.num_heads[level]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown U-Net config keys {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


_TINY = UNetConfig(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_levels=(False, True, True),
    num_heads=2,
    norm_groups=8,
)

UNET_PRESETS: dict[str, UNetConfig] = {
    # ~1M parameters: trains on digits / shapes on a laptop CPU in minutes.
    "tiny": _TINY,
    # ~8M parameters: better quality for shapes:64 / latent models.
    "small": UNetConfig(
        block_out_channels=(64, 128, 192),
        layers_per_block=2,
        attention_levels=(False, True, True),
        num_heads=4,
        norm_groups=16,
    ),
    # ~10M parameters: the embedded default text-to-image model (f4 latents of shapes:64,
    # 16x16x4). Cross-attention to the MiniLM tokens at every level (16x16, 8x8, 4x4).
    "shapes-t2i": UNetConfig(
        block_out_channels=(48, 96, 192),
        layers_per_block=1,
        attention_levels=(True, True, True),
        num_heads=(2, 4, 4),
        norm_groups=16,
    ),
    # ~2M parameters: `tiny` (the embedded text-to-image model's U-Net, f4 latents of
    # shapes:64) plus a learned 16x16 position map telling it where "top left" is.
    "shapes-t2i-tiny": dataclasses.replace(_TINY, position_embedding=16),
    # ~2.4M parameters: `tiny` with a 2-layer context refiner (width 128) over the MiniLM
    # tokens, so each object's words meet before cross-attention (two-object attribute binding).
    "shapes-t2i-bind": dataclasses.replace(_TINY, context_refiner=2),
    # ~2.3M parameters: the embedded x4 upscaler (pixels; 3 + 3 input channels). Super-resolution
    # is local: no attention above the 16x16 level of a 64x64 output.
    "shapes-sr": UNetConfig(
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        attention_levels=(False, False, True),
        num_heads=2,
        norm_groups=8,
    ),
    # Stable Diffusion 1.x U-Net (Rombach et al. 2022): 859,520,964 parameters.
    "sd15": UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(True, True, True, False),
        num_heads=8,
        cross_attention_dim=768,
    ),
    # Stable Diffusion 2.x U-Net: 64-dim heads, linear projections, OpenCLIP-H context.
    "sd21": UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(True, True, True, False),
        num_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        linear_projection=True,
    ),
    # SDXL base U-Net (Podell et al. 2023): 2,567,463,684 parameters; no attention at the
    # first level, 1 / 2 / 10 transformer blocks per level, OpenCLIP-bigG pooled + size ids.
    "sdxl": UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_levels=(False, True, True),
        num_heads=(5, 10, 20),
        transformer_depth=(1, 2, 10),
        cross_attention_dim=2048,
        linear_projection=True,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    # SDXL refiner U-Net: 2,259,526,660 parameters; context is bigG's alone (1280), the ids
    # are (size, crop, aesthetic score): 1280 + 5 x 256 = 2560.
    "sdxl-refiner": UNetConfig(
        in_channels=4,
        out_channels=4,
        block_out_channels=(384, 768, 1536, 1536),
        layers_per_block=2,
        attention_levels=(False, True, True, False),
        num_heads=(6, 12, 24, 24),
        transformer_depth=4,
        cross_attention_dim=1280,
        linear_projection=True,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
    ),
}


def unet_preset(name: str, **overrides) -> UNetConfig:
    """A registered config with fields replaced, e.g. unet_preset("tiny", in_channels=1)."""
    if name not in UNET_PRESETS:
        raise UserError(f"unknown U-Net preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
    return dataclasses.replace(UNET_PRESETS[name], **overrides)

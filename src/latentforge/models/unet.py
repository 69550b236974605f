"""One U-Net (Ronneberger 2015; DDPM; LDM), from 1M-parameter CPU models to the exact SD U-Net.

The network sees only (x, t, class_labels, context): noise-level maths live in `denoisers.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    ContextRefiner,
    Downsample,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    group_norm,
    timestep_embedding,
)
from .presets import UNetConfig

# A ControlNet's output: one residual per U-Net skip connection (encoder order), then the mid
# block's.
Residuals = tuple[list[torch.Tensor], torch.Tensor]


class _Level(nn.Module):
    """One resolution of the encoder or decoder: ResNet blocks, optional attention, resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()


class UNet(nn.Module):
    """`time_cond_proj_dim` > 0 adds diffusers' guidance-scale embedding (LCM, Luo et al. 2023;
    Meng et al. 2023): w -> Fourier features -> `cond_proj` (no bias), added to the sinusoidal
    time features before the time MLP, as `UNet2DConditionModel` does with `timestep_cond`.
    Zero-initialised, so a network given the embedding computes what it did without it.
    `guidance` is the scale used when a call passes none (a model folder's
    `guidance_embedding.guidance`), so a pipeline that knows nothing of it runs one pass.

    `decoder=False` builds the encoder half only (conv_in, embeddings, down blocks, mid block):
    what a ControlNet copies (`models/controlnet.py`)."""

    def __init__(
        self,
        config: UNetConfig,
        *,
        time_cond_proj_dim: int | None = None,
        guidance: float = 1.0,
        decoder: bool = True,
    ):
        super().__init__()
        self.config = c = config
        chans = c.block_out_channels
        n_levels = len(chans)
        if len(c.attention_levels) != n_levels:
            raise ValueError("attention_levels needs one flag per entry of block_out_channels")
        temb_dim = chans[0] * 4
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        n = c.position_embedding
        self.position_embedding = nn.Parameter(torch.zeros(1, chans[0], n, n)) if n else None
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        self.time_cond_proj_dim = time_cond_proj_dim or None
        self.guidance = guidance
        if self.time_cond_proj_dim:  # diffusers' time_embedding.cond_proj
            self.time_embedding.cond_proj = nn.Linear(time_cond_proj_dim, chans[0], bias=False)
            nn.init.zeros_(self.time_embedding.cond_proj.weight)
        # Class embedding with one extra row: index num_classes is the null (unconditional) class.
        self.class_embedding = nn.Embedding(c.num_classes + 1, temb_dim) if c.num_classes else None
        self.add_embedding = None
        if c.addition_time_embed_dim:  # SDXL: pooled text + size / crop ids (diffusers' names)
            self.add_embedding = TimestepEmbedding(
                c.projection_class_embeddings_input_dim, temb_dim
            )
        self.context_refiner = None
        if c.context_refiner:
            if c.cross_attention_dim is None:
                raise ValueError("context_refiner needs cross_attention_dim (a text model)")
            self.context_refiner = ContextRefiner(
                c.cross_attention_dim, c.context_refiner_width, c.context_refiner
            )
        self._refined: list[tuple] = []  # inference memo of refine_context, newest last

        def resnet(i: int, o: int) -> ResnetBlock:
            return ResnetBlock(i, o, temb_dim=temb_dim, groups=c.norm_groups, dropout=c.dropout)

        def transformer(ch: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(
                ch,
                c.heads_at(level),
                context_dim=c.cross_attention_dim,
                depth=c.depth_at(level),
                groups=c.norm_groups,
                linear_projection=c.linear_projection,
            )

        self.down_blocks = nn.ModuleList()
        skip_chans = [chans[0]]
        ch = chans[0]
        for level, out in enumerate(chans):
            block = _Level()
            for _ in range(c.layers_per_block):
                block.resnets.append(resnet(ch, out))
                ch = out
                if c.attention_levels[level]:
                    block.attentions.append(transformer(ch, level))
                skip_chans.append(ch)
            if level < n_levels - 1:
                block.downsamplers = nn.ModuleList([Downsample(ch)])
                skip_chans.append(ch)
            self.down_blocks.append(block)

        self.mid_block = _Level()
        self.mid_block.resnets.append(resnet(ch, ch))
        if c.mid_attention:
            self.mid_block.attentions.append(transformer(ch, n_levels - 1))
        self.mid_block.resnets.append(resnet(ch, ch))
        if not decoder:
            return

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(n_levels)):
            out = chans[level]
            block = _Level()
            for _ in range(c.layers_per_block + 1):
                block.resnets.append(resnet(ch + skip_chans.pop(), out))
                ch = out
                if c.attention_levels[level]:
                    block.attentions.append(transformer(ch, level))
            if level > 0:
                block.upsamplers = nn.ModuleList([Upsample(ch)])
            self.up_blocks.append(block)

        self.conv_norm_out = group_norm(ch, c.norm_groups)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        extra_emb: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        control: Residuals | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) fractional timesteps; class_labels: (B,), num_classes = null;
        context: (B, tokens, D) text hidden states; context_mask: (B, tokens), True = keep;
        extra_emb: (B, temb_dim) added to the time embedding (e.g. a noise-augmentation level);
        guidance: (B,) guidance scales g for a network with `time_cond_proj_dim` (default: its
        `guidance`); a network without one has no such input and ignores it; control: a
        ControlNet's residuals (one per skip connection, then the mid block's), added to the
        skips and the mid block's output as in Zhang et al. 2023; text_embeds (B, P) pooled
        text embedding and time_ids (B, N) size / crop (/ aesthetic score) ids: SDXL's added
        conditioning (`embed_time`)."""
        temb = self.embed_time(
            x, t, class_labels=class_labels, extra_emb=extra_emb, guidance=guidance,
            text_embeds=text_embeds, time_ids=time_ids,
        )  # fmt: skip
        if context is not None:
            context = self.refine_context(context, context_mask)
        h, skips = self.encode(self.stem(x), temb, context, context_mask)
        if control is not None:
            down, mid = control
            if len(down) != len(skips):
                raise ValueError(f"control has {len(down)} skip residuals, the U-Net {len(skips)}")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down, strict=True)]
            h = h + mid.to(h.dtype)
        for block in self.up_blocks:
            for i, res in enumerate(block.resnets):
                h = res(torch.cat([h, skips.pop()], dim=1), temb)
                if len(block.attentions):
                    h = block.attentions[i](h, context, context_mask)
            if hasattr(block, "upsamplers"):
                # Match the skip's size so odd resolutions still work.
                size = skips[-1].shape[-2:] if skips else None
                h = block.upsamplers[0](h, size)

        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def embed_time(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        extra_emb: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The embedding every ResNet block adds: timestep (+ guidance scale, class, SDXL's
        added text-time embedding, extra)."""
        c = self.config
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(
            t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )
        if self.time_cond_proj_dim:
            if guidance is None:
                guidance = torch.full(t.shape, self.guidance, device=t.device)
            proj = self.time_embedding.cond_proj
            w_emb = guidance_embedding(guidance.to(t.device), self.time_cond_proj_dim)
            emb = emb + proj(w_emb.to(proj.weight.dtype)).float()
        temb = self.time_embedding(emb.to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:  # no label given: the null class
                class_labels = torch.full_like(t, c.num_classes, dtype=torch.long)
            temb = temb + self.class_embedding(class_labels)
        if self.add_embedding is not None:
            temb = temb + self.embed_added(text_embeds, time_ids).to(temb.dtype)
        if extra_emb is not None:
            temb = temb + extra_emb
        return temb

    def embed_added(
        self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """SDXL's added embedding (Podell et al. 2023, sec. 2.2): each of the N size / crop
        (/ aesthetic score) ids through the timestep's sinusoidal features, concatenated after
        the pooled text embedding, through `add_embedding`. (B, P), (B, N) -> (B, temb_dim)."""
        c = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError("this U-Net (SDXL) needs text_embeds and time_ids")
        width = text_embeds.shape[-1] + time_ids.shape[-1] * c.addition_time_embed_dim
        if text_embeds.ndim != 2 or width != c.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} "
                f"give {width} added features; this U-Net takes "
                f"{c.projection_class_embeddings_input_dim}"
            )
        ids = timestep_embedding(
            time_ids.flatten(),
            c.addition_time_embed_dim,
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
        ).reshape(len(text_embeds), -1)  # (B, N * addition_time_embed_dim)
        proj = self.add_embedding
        return proj(torch.cat([text_embeds.float(), ids], -1).to(proj.linear_1.weight.dtype))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv_in (and the learned position map, if any)."""
        h = self.conv_in(x)
        if self.position_embedding is not None:
            pos = self.position_embedding
            if pos.shape[-2:] != h.shape[-2:]:
                pos = F.interpolate(pos, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = h + pos.to(h.dtype)
        return h

    def encode(
        self,
        h: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down blocks and mid block from the stem's output: (mid output, skip tensors), the
        skips in the order the decoder's concatenations pop them from the end. `context` is
        already refined (`refine_context`)."""
        skips = [h]
        for block in self.down_blocks:
            for i, res in enumerate(block.resnets):
                h = res(h, temb)
                if len(block.attentions):
                    h = block.attentions[i](h, context, context_mask)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block.resnets[0](h, temb)
        for attn in self.mid_block.attentions:
            h = attn(h, context, context_mask)
        h = self.mid_block.resnets[1](h, temb)
        return h, skips

    def refine_context(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The text tokens as cross-attention sees them: through the context refiner, if any.

        The refiner depends on the prompt only, so at inference (no autograd) the last two
        results are kept and reused when the same tokens come again, compared by value: a
        sampler's steps (and classifier-free guidance's two batch layouts) pay for it once.
        The key holds the refiner weights' version counters, so an in-place update (EMA, a
        loaded state) is never served a stale result.
        """
        if self.context_refiner is None:
            return context
        if torch.is_grad_enabled():
            return self.context_refiner(context, mask)
        weights = tuple(p._version for p in self.context_refiner.parameters())  # in-place edits
        key = (context.shape, context.dtype, context.device, torch.is_autocast_enabled(), weights)
        for k, c, m, out in self._refined:
            if k == key and torch.equal(c, context) and _same_mask(m, mask):
                return out
        out = self.context_refiner(context, mask)
        self._refined = [*self._refined[-1:], (key, context, mask, out)]
        return out


def guidance_embedding(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' `get_guidance_scale_embedding` of w = g - 1 (LCM's guidance convention):
    sin-first Fourier features of 1000 w with frequencies 10000^(-i / (dim/2 - 1)), (B,) ->
    (B, dim)."""
    w = (guidance.float() - 1) * 1000
    return timestep_embedding(w, dim, flip_sin_to_cos=False, freq_shift=1.0)


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""`latentforge train diffusion | vae`: options -> a training config -> the trainer."""

from __future__ import annotations

import click

from .options import quiet_option, seed_option, stack

oversample_option = click.option(
    "--oversample", metavar="WORDS=FACTOR", multiple=True,
    help="shapes data: draw images holding such an object FACTOR times as often, e.g. "
         "'small star=3' (size, colour and/or shape words, optionally 'on COLOUR' for the "
         "background: 'blue star on gray=4'; repeatable; draws with replacement)",
)  # fmt: skip


resume_option = stack(
    click.option("--resume", is_flag=True, help="continue from the newest complete checkpoint "
                 "in --out (a corrupt or partial one is skipped with a warning)"),
    click.option("--resume-override", metavar="KEY", multiple=True,
                 help="with --resume: let this setting differ from the checkpoint's, e.g. "
                      "'lr' or 'batch-size' (repeatable); --max-steps, --ckpt-every, "
                      "--sample-every, --lr-schedule, --quiet and the caches may change "
                      "without it"),
)  # fmt: skip

scale_options = stack(
    click.option("--fsdp", is_flag=True,
                 help="under torchrun: shard parameters, gradients and optimizer state "
                      "(FSDP2; checkpoints sharded, loadable on any world size)"),
    click.option("--grad-checkpoint", is_flag=True,
                 help="recompute each U-Net block's activations in backward (less memory)"),
    click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
                 help="steps per line of OUT/train_log.jsonl (loss, images/s per rank)"),
)  # fmt: skip


@click.group()
def train() -> None:
    """Train a model from scratch (diffusion U-Net or VAE), or a LoRA on one."""


@train.command("diffusion")
@click.option("--data", required=True,
              help="shapes[:RES], digits[:RES], folder:PATH or wds:SHARDS")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="model folder")
@click.option(
    "--cond", type=click.Choice(["none", "class", "text"]), default="none", show_default=True
)
@click.option("--preset", default="tiny", show_default=True, help="U-Net preset")
@click.option("--max-steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True, help="after warm-up: constant, or cosine decay to 0 at "
                                      "--max-steps (may change on --resume)")  # fmt: skip
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.999, show_default=True)
@click.option("--prediction", type=click.Choice(["eps", "v", "x0"]), default=None,
              help="what the network predicts [default: v with --vae, eps for pixels]")  # fmt: skip
@click.option(
    "--beta-schedule",
    type=click.Choice(["linear", "scaled_linear", "cosine"]),
    default="cosine",
    show_default=True,
)
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast for the forward pass")
@seed_option()
@click.option("--sample-every", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--vae", type=click.Path(), default=None, help="VAE folder: latent diffusion")
@click.option("--cache-latents", is_flag=True, help="encode the dataset once (with --vae)")
@click.option("--cache-text", is_flag=True,
              help="encode every training caption once (--cond text; float16 table)")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="store the --cache-latents / --cache-text tables here and reuse them (resume, "
                   "other runs on the same data, VAE and text encoder)")  # fmt: skip
@click.option("--text-encoder", type=click.Choice(["minilm"]), default="minilm", show_default=True)
@click.option("--text-phrases", type=click.IntRange(min=0), default=0, show_default=True,
              help="phrase slots after the text tokens: the mean state of each phrase of the "
                   "prompt (an object with its colour, size and place), so cross-attention "
                   "sees each object bound in one key (0: tokens only)")  # fmt: skip
@click.option("--text-phrase-only", is_flag=True,
              help="with --text-phrases: condition on the phrase slots and the prompt's mean "
                   "state alone, without the token states")  # fmt: skip
@click.option("--task", type=click.Choice(["generate", "superres", "inpaint"]), default="generate",
              show_default=True, help="superres / inpaint: an image-conditioned model")  # fmt: skip
@click.option("--scale", type=click.Choice(["2", "4"]), default="4", show_default=True,
              callback=lambda ctx, param, v: int(v),
              help="--task superres: upscaling factor")  # fmt: skip
@click.option("--crop", type=click.IntRange(min=0), default=0, show_default=True,
              help="--task superres: train on random CROPxCROP crops (0: whole images); "
                   "the model still upscales whole images, tile by tile")  # fmt: skip
@click.option("--init-from", type=click.Path(), default=None,
              help="start from this diffusion model folder's weights (fine-tuning); a wider "
                   "conv_in (--task inpaint / superres) gets zero kernels for the new "
                   "channels")  # fmt: skip
@oversample_option
@scale_options
@click.option("--object-weight", metavar="WORDS=FACTOR", multiple=True,
              help="shapes data: weigh the loss on the pixels of such an object (its box, one "
                   "latent cell wider) FACTOR times, e.g. 'small star=4' (words as --oversample; "
                   "repeatable)")  # fmt: skip
@click.option("--region-captions", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              metavar="P",
              help="shapes data, --cond text: caption this share of the two-object images as "
                   "one of their objects alone (the prompt regional prompting gives its box) "
                   "and leave the other object's box out of the loss")  # fmt: skip
@resume_option
@quiet_option
def train_diffusion_cmd(resume: bool, resume_override: tuple[str, ...], **kw) -> int:
    """Train a diffusion U-Net, in pixel space or (with --vae) in a VAE's latent space."""
    from ..training import TrainConfig, train_diffusion

    if kw["prediction"] is None:
        # Latents have no fixed range to clip x0 estimates to, and an eps model's x0 estimate at
        # high noise is its eps error times sigma: v-prediction stays bounded there.
        kw["prediction"] = "v" if kw["vae"] else "eps"
    return train_diffusion(TrainConfig(**kw), resume=resume, resume_override=resume_override)


@train.command("vae")
@click.option("--data", required=True, help="shapes[:RES], digits[:RES] or folder:PATH")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="model folder")
@click.option("--preset", default="f4-tiny", show_default=True, help="VAE preset")
@click.option("--max-steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True, help="after warm-up: constant, or cosine decay to 0 at "
                                      "--max-steps (may change on --resume)")  # fmt: skip
@click.option("--kl-weight", type=click.FloatRange(min=0), default=1e-6, show_default=True)
@click.option("--loss", type=click.Choice(["l1", "l2"]), default="l1", show_default=True)
@click.option("--edge-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="extra weight of the reconstruction loss on and next to the target's edges "
                   "(pixels weigh 1 + this there; small shapes are mostly edge)")  # fmt: skip
@click.option(
    "--disc-start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="step at which the patch discriminator (hinge loss) starts; 0 = never",
)
@click.option("--disc-weight", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option("--crop", type=click.IntRange(min=0), default=0, show_default=True,
              help="train on random CROPxCROP crops (a multiple of the downsampling factor; "
                   "0: whole images); evaluation uses whole images")  # fmt: skip
@click.option(
    "--init-from",
    type=click.Path(),
    default=None,
    help="start from this VAE folder's weights (its architecture; --preset is ignored)",
)
@click.option("--decoder-only", is_flag=True,
              help="with --init-from: train the decoder alone; the encoder, the latent space "
                   "and the scaling factor stay the source's, so diffusion models trained on "
                   "its latents can use the new decoder")  # fmt: skip
@click.option("--bf16/--no-bf16", default=False)
@seed_option()
@click.option("--sample-every", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=500, show_default=True)
@oversample_option
@resume_option
@quiet_option
def train_vae_cmd(resume: bool, resume_override: tuple[str, ...], **kw) -> int:
    """Train a KL autoencoder; its scaling factor and PSNR go into model.json."""
    from ..training.vae_train import VAETrainConfig, train_vae

    return train_vae(VAETrainConfig(**kw), resume=resume, resume_override=resume_override)


@train.command("lora")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="base model folder (default: the embedded model)")  # fmt: skip
@click.option("--data", required=True, help="folder:PATH[:RES] (captions: metadata.jsonl or "
              ".txt sidecars), or any data spec at the model's image size")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="run folder: OUT/lora.safetensors and checkpoints/")  # fmt: skip
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="LoRA alpha (scale alpha / rank) [default: the rank]")  # fmt: skip
@click.option("--lora-target", type=click.Choice(["attn", "conv"]), default="attn",
              show_default=True,
              help="attn: the U-Net's attention projections; conv: convs too (LoCon)")  # fmt: skip
@click.option("--train-text-encoder", is_flag=True,
              help="also a LoRA on the text encoder's attention projections")  # fmt: skip
@click.option("--format", type=click.Choice(["kohya", "diffusers"]), default="kohya",
              show_default=True, help="keys of the saved file (kohya: A1111, ComfyUI)")  # fmt: skip
@click.option("--instance-prompt", default=None,
              help="DreamBooth: caption every training image with this prompt, e.g. "
                   "'a sks hexagon'")  # fmt: skip
@click.option("--class-prompt", default=None,
              help="DreamBooth prior preservation: also train on the base model's own images "
                   "of this prompt, e.g. 'a hexagon'")  # fmt: skip
@click.option("--num-class-images", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--prior-weight", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--min-snr-gamma", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="min-SNR loss weighting (Hang et al. 2023)")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True)  # fmt: skip
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast for the forward pass")
@seed_option()
@click.option("--sample-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=100, show_default=True)
@resume_option
@quiet_option
def train_lora_cmd(resume: bool, resume_override: tuple[str, ...], **kw) -> int:
    """Train a LoRA on a model folder (docs/lora.md): the base weights stay frozen."""
    from ..training.lora_train import LoraTrainConfig, train_lora

    return train_lora(LoraTrainConfig(**kw), resume=resume, resume_override=resume_override)


@train.command("ddgan")
@click.option("--data", required=True,
              help="shapes[:RES], digits[:RES], folder:PATH or wds:SHARDS")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="model folder")
@click.option(
    "--cond", type=click.Choice(["none", "class", "text"]), default="none", show_default=True
)
@click.option("--preset", default="tiny", show_default=True, help="the generator's U-Net preset")
@click.option("--num-steps", type=click.IntRange(1, 8), default=4, show_default=True,
              help="T: denoising steps of the model (its sampling steps)")  # fmt: skip
@click.option("--disc-channels", default="32,64,128", show_default=True,
              callback=lambda ctx, param, v: _widths(v),
              help="the discriminator's widths, one per level (each level halves)")  # fmt: skip
@click.option("--r1-gamma", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="R1 penalty on the discriminator's gradient at real pairs")  # fmt: skip
@click.option("--recon-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="add this x the x0 regression error to the generator's loss (fine-tuning "
                   "a diffusion model with --init-from)")  # fmt: skip
@click.option("--beta-schedule", type=click.Choice(["linear", "scaled_linear", "cosine"]),
              default="cosine", show_default=True)  # fmt: skip
@click.option("--prediction", type=click.Choice(["eps", "v", "x0"]), default="x0",
              show_default=True,
              help="what the generator predicts (with --init-from: the model's)")  # fmt: skip
@click.option("--init-from", type=click.Path(), default=None,
              help="start the generator from this diffusion model folder's weights")  # fmt: skip
@click.option("--vae", type=click.Path(), default=None, help="VAE folder: latent DDGAN")
@click.option("--cache-latents", is_flag=True, help="encode the dataset once (with --vae)")
@click.option("--cache-text", is_flag=True, help="encode every training caption once")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="keep the --cache-latents / --cache-text tables here, reused")  # fmt: skip
@click.option("--label-dropout", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="share of captions / labels dropped (the unconditional model)")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True)
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.999, show_default=True)
@click.option("--bf16/--no-bf16", default=False, help="bf16 autocast for the forward pass")
@seed_option()
@click.option("--sample-every", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=500, show_default=True)
@scale_options
@resume_option
@quiet_option
def train_ddgan_cmd(resume: bool, resume_override: tuple[str, ...], **kw) -> int:
    """Train a denoising-diffusion GAN (Xiao et al. 2022; docs/few-step.md): a T-step model
    whose reverse steps are learned adversarially, sampled by ddpm in T steps."""
    from ..training.ddgan import DDGANConfig, train_ddgan

    return train_ddgan(DDGANConfig(**kw), resume=resume, resume_override=resume_override)


def _widths(value: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give widths like 32,64,128") from None
    if not widths or min(widths) < 1 or max(widths) > 1024:
        raise click.BadParameter(f"{value!r}: widths must be in 1..1024")
    return widths


@train.command("controlnet")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="base model folder (default: the embedded model)")  # fmt: skip
@click.option("--data", required=True,
              help="any data spec at the model's image size: each item's image (or what its "
                   "data draws for the preprocessor: shapes draws sketches) is the control "
                   "source, its caption the prompt")  # fmt: skip
@click.option("--control", required=True, metavar="KIND",
              help="the preprocessor that makes control images: canny, scribble, sketch, "
                   "none")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="the ControlNet model folder (and checkpoints/)")  # fmt: skip
@click.option("--embedding-channels", default="",
              callback=lambda ctx, param, v: _widths(v) if v else (),
              help="widths of the control image's encoder, one per VAE halving + 1 "
                   "[default: 16,32,...]")  # fmt: skip
@click.option("--caption-dropout", "label_dropout", type=click.FloatRange(0, 1), default=0.3,
              show_default=True,
              help="share of captions replaced by the empty prompt")  # fmt: skip
@click.option("--min-snr-gamma", type=click.FloatRange(min=0, min_open=True), default=None,
              help="min-SNR loss weighting (Hang et al. 2023) [default: none, plain MSE: the "
                   "layout a control sets is decided at high noise levels, which min-SNR "
                   "weighs down]")  # fmt: skip
@click.option("--max-steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True)  # fmt: skip
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--cache-latents", is_flag=True, help="encode the dataset once (latent models)")
@click.option("--cache-text", is_flag=True, help="encode every training caption once")
@click.option("--fp16", is_flag=True, help="save the ControlNet's weights in float16")
@seed_option()
@click.option("--sample-every", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="steps per line of OUT/train_log.jsonl")  # fmt: skip
@resume_option
@quiet_option
def train_controlnet_cmd(resume: bool, resume_override: tuple[str, ...], **kw) -> int:
    """Train a ControlNet on a model folder (docs/controlnet.md): the U-Net and the text
    encoder stay frozen; the ControlNet starts as a copy of the U-Net's encoder."""
    from ..training.controlnet_train import ControlNetTrainConfig, train_controlnet

    return train_controlnet(
        ControlNetTrainConfig(**kw), resume=resume, resume_override=resume_override
    )

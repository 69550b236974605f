"""Training a diffusion U-Net: pixel or latent space, unconditional, class or text conditioned.

`TrainConfig` (the settings of `train diffusion`) lives here beside `DiffusionTrainer`, which
reads it; the task trainers (`training/tasks.py`) subclass this one, and `tasks.train_diffusion`,
the entry point, picks among them.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..denoisers import make_denoiser
from ..errors import UserError
from ..io.model_folder import DataInfo, LatentInfo, ModelMeta, SamplingDefaults
from ..prompt_syntax import escape
from .loop import Trainer, render_dataset, to_device


@dataclass
class TrainConfig:
    """The settings of one diffusion training run (`train diffusion`'s options). Checkpoints and
    model.json record all of them. A `--resume` keeps every one but RESUME_FREE, the settings
    that change neither the model nor what it learns from (how long, how often it saves or
    samples, the lr decay after warm-up, caches), unless `--resume-override KEY` names it."""

    RESUME_FREE: ClassVar[frozenset[str]] = frozenset({
        "out", "max_steps", "ckpt_every", "sample_every", "keep_checkpoints", "quiet",
        "lr_schedule", "cache_latents", "cache_text", "cache_dir", "fsdp", "grad_checkpoint",
        "log_every",
    })  # fmt: skip
    data: str
    out: str
    preset: str = "tiny"
    cond: str = "none"
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # after warm-up: constant, or cosine decay to 0 at max_steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    bf16: bool = False
    seed: int = 0
    sample_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    prediction: str = "eps"
    beta_schedule: str = "cosine"
    min_snr_gamma: float | None = 5.0
    vae: str | None = None  # a VAE model folder: train in its latent space
    cache_latents: bool = False  # encode the dataset once (posterior moments) instead of per step
    cache_text: bool = False  # text models: encode every training caption once, not per step
    cache_dir: str | None = None  # keep the --cache-latents / --cache-text tables on disk here
    text_encoder: str = "minilm"
    text_phrases: int = 0  # phrase slots after the text encoder's tokens (models/text.py)
    text_phrase_only: bool = False  # the phrase slots and the prompt's mean state, no tokens
    quiet: bool = False
    task: str = "generate"  # generate | superres | inpaint (training/tasks.py)
    scale: int = 4  # superres: the upscaling factor, 2 or 4
    crop: int = 0  # superres: train on random crops of this size (0: whole images)
    init_from: str | None = None  # a diffusion model folder whose weights to start from
    oversample: tuple[str, ...] = ()  # shapes data: "WORDS=FACTOR" rules (ImageDataset hooks)
    object_weight: tuple[str, ...] = ()  # shapes data: "WORDS=FACTOR" loss weights on objects
    region_captions: float = 0.0  # shapes text models: share of two-object images captioned as
    # one of their objects alone, the other object's box left out of the loss (data.py)
    fsdp: bool = False  # under torchrun: shard params, grads, optimizer state (sharded.py)
    grad_checkpoint: bool = False  # recompute each U-Net block's activations in backward
    log_every: int = 50  # steps per line of OUT/train_log.jsonl (loss, images/s per rank)


class DiffusionTrainer(Trainer):
    """A U-Net trained by its denoiser's loss (`denoisers.py`), in pixel space or a VAE's latent
    space, unconditional or class / text conditioned; `--task generate`. Task trainers add the
    network inputs of their task through `task_cond`."""

    cfg: TrainConfig

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        # The loss must run the network through self.ddp (the DDP wrapper under torchrun, whose
        # forward readies the gradient all-reduce; self.model in one process), so the denoiser
        # is built around it once it exists: make_denoiser takes any nn.Module. Its schedule
        # tables are build_denoiser's for self.meta (the same make_denoiser call); `.to` moves
        # them, the network being there already.
        self.denoiser = make_denoiser(self.ddp, self.meta.parameterization).to(self.device)

    def setup(self) -> None:
        from ..io.model_folder import build_denoiser, load_vae

        cfg, ds = self.cfg, self.dataset
        if cfg.cond not in ("none", "class", "text"):
            raise UserError(f"--cond {cfg.cond!r} is not supported; use none, class or text")
        if cfg.cond == "class" and not ds.num_classes:
            raise UserError(f"--cond class needs labels, but {cfg.data!r} has none")
        self.vae, self.scaling_factor = None, 1.0
        if cfg.vae:
            self.vae, self.vae_meta = load_vae(cfg.vae)
            if self.vae_meta.data.channels != ds.channels:
                raise UserError(f"--vae {cfg.vae} expects {self.vae_meta.data.channels}-"
                                f"channel images; {cfg.data!r} has {ds.channels}")  # fmt: skip
            if self.vae_meta.scaling_factor is None:
                raise UserError(f"--vae {cfg.vae}: its model.json has no scaling_factor")
            self.scaling_factor = self.vae_meta.scaling_factor
        self.text_encoder, self._text_table = None, None
        if cfg.cond == "text":
            from ..models.text import build_text_encoder

            self.text_encoder = build_text_encoder(
                {"type": cfg.text_encoder, "phrases": cfg.text_phrases,
                 "phrase_only": cfg.text_phrase_only}
            )  # fmt: skip
        if self.vae is not None:
            self.vae.to(self.device)
        if self.text_encoder is not None:
            self.text_encoder.to(self.device)
        self.meta = self.build_meta()
        # the network a model folder of this meta holds (a ConcatUNet for the tasks); the
        # denoiser around it comes in __init__, once the DDP wrapper exists
        self.model = build_denoiser(self.meta).model
        if cfg.init_from:
            provenance = init_from_folder(self.model, self.meta, cfg.init_from)
            self.meta = self.meta.replace(init_from=provenance)
        self._object_rules = None  # --object-weight, parsed once
        if cfg.object_weight:
            if cfg.crop:
                raise UserError("--object-weight weighs whole images; it does not take --crop")
            self._object_rules = ds.object_rules(cfg.object_weight, "--object-weight")
        if cfg.region_captions:
            if not 0 < cfg.region_captions <= 1:
                raise UserError(
                    f"--region-captions is a share in (0, 1], got {cfg.region_captions}"
                )
            if cfg.cond != "text" or not ds.lists_objects:
                raise UserError("--region-captions needs --cond text on data whose images "
                                "list their objects (shapes)")  # fmt: skip
            if cfg.crop:
                raise UserError("--region-captions needs whole images; it does not take --crop")

    def build_meta(self) -> ModelMeta:
        from ..models.presets import unet_preset

        ds, cfg = self.dataset, self.cfg
        channels, resolution = ds.channels, ds.resolution
        latent = None
        if self.vae is not None:
            f = self.vae.downsample_factor
            if resolution % f:
                raise UserError(f"image size {resolution} is not a multiple of the VAE's f={f}")
            channels, resolution = self.vae.latent_channels, resolution // f
            latent = LatentInfo(
                scaling_factor=self.scaling_factor,
                image_resolution=ds.resolution,
                image_channels=ds.channels,
            )
        unet = unet_preset(
            cfg.preset,
            in_channels=channels,
            out_channels=channels,
            num_classes=ds.num_classes if cfg.cond == "class" else 0,
            cross_attention_dim=self.text_encoder.dim if self.text_encoder else None,
        )
        text = self.text_encoder is not None
        return ModelMeta(
            kind="diffusion",
            cond=cfg.cond,
            unet=unet.to_dict(),
            parameterization={
                "type": "vp",
                "prediction": cfg.prediction,
                "beta_schedule": cfg.beta_schedule,
                "num_timesteps": 1000,
                "min_snr_gamma": cfg.min_snr_gamma,
                # pixel models live in [-1, 1]; latents have no such bound
                "clip_denoised": None if latent else 1.0,
            },
            data=DataInfo(
                spec=cfg.data,
                resolution=resolution,
                channels=channels,
                num_classes=ds.num_classes if cfg.cond == "class" else 0,
                class_names=tuple(ds.class_names) if cfg.cond == "class" else (),
            ),
            sampling=SamplingDefaults(
                sampler="ddim",
                steps=50,
                spacing="trailing",
                guidance=3.0 if text else 1.0,
                # e.g. shapes data: the planner reads the shapes grammar
                layout=ds.default_layout if text else None,
            ),
            latent=latent,
            text_encoder=self.text_encoder.spec if text else None,
        )

    def _maybe_cache_dataset(self) -> dict | None:
        cfg = self.cfg
        if self.dataset.streamed and (cfg.cache_latents or cfg.cache_text):
            raise UserError(f"--cache-latents and --cache-text need data held in memory; "
                            f"{cfg.data!r} is a stream")  # fmt: skip
        path = self._cache_file()  # digests the VAE weights: once
        if path is not None and path.is_file():
            # the data table may be absent (a text table only, for data not kept in memory)
            return self._load_stored_cache(path)
        cache = super()._maybe_cache_dataset()
        if self.vae is not None and self.cfg.cache_latents:
            if cache is None:
                if len(self.dataset) > 200_000:
                    raise UserError("--cache-latents needs a dataset of at most 200,000 images")
                cache = to_device(render_dataset(self.dataset), self.device)
            # Posterior moments once; each step still samples z ~ q(z | x) with its own noise.
            with torch.no_grad():
                moments = [self.vae.encode(chunk).moments for chunk in cache["image"].split(256)]
            cache["moments"] = torch.cat(moments)
            del cache["image"]
        self._text_table = None
        if self.text_encoder is not None and self.cfg.cache_text:
            captions = cache["caption"] if cache is not None else None
            self._text_table = self._encode_captions(captions)
        self._store_cache(path, cache)
        return cache

    # ----- the --cache-dir file -------------------------------------------------------------
    def _cache_file(self) -> Path | None:
        """CACHE_DIR/<key>.safetensors, the key a digest of everything the tables depend on:
        the data spec and seed, the VAE's weights (latents), the text encoder (captions)."""
        import hashlib
        import json

        cfg = self.cfg
        latents = self.vae is not None and cfg.cache_latents
        text = self.text_encoder is not None and cfg.cache_text
        if not cfg.cache_dir or not (latents or text):
            return None

        key = {
            "version": 1,
            "data": cfg.data,
            "seed": cfg.seed,
            "vae": self._vae_digest() if latents else None,
            "text": self.text_encoder.spec if text else None,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return Path(cfg.cache_dir) / f"{digest}.safetensors"

    def _vae_digest(self) -> str:
        """The --cache-dir key of the VAE: its file's digest, or (a trainer that took the VAE
        from a base model folder: lora, controlnet) a hash of its weights."""
        import hashlib

        from ..io.checkpoint import MODEL_WEIGHTS
        from ..io.model_folder import file_digest

        if self.cfg.vae:
            return file_digest(Path(self.cfg.vae) / MODEL_WEIGHTS)
        h = hashlib.sha256()
        for name, t in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def _store_cache(self, path: Path | None, cache: dict | None) -> None:
        import json

        from tqdm.auto import tqdm

        from ..io.checkpoint import save_tensors_atomic

        # one writer per node (its local rank 0): a --cache-dir on node-local disk is filled
        # on every node; on a shared one, the atomic write lets the last rename win
        if path is None or int(os.environ.get("LOCAL_RANK", self.rank)) != 0 or path.exists():
            return
        tensors = {f"data.{k}": v for k, v in (cache or {}).items() if torch.is_tensor(v)}
        tensors.update({f"text.{k}": v for k, v in (self._text_table or {}).items()})
        meta = {"captions": json.dumps(cache["caption"])} if cache is not None else {}
        save_tensors_atomic(path, tensors, {**meta, "spec": self.cfg.data})
        if not self.cfg.quiet:
            tqdm.write(f"cached tables stored in {path}")

    def _load_stored_cache(self, path: Path) -> dict | None:
        """The stored data table (None when the file holds only the caption table); sets the
        caption table."""
        import json

        from safetensors import safe_open
        from tqdm.auto import tqdm

        tensors = {}
        with safe_open(str(path), framework="pt", device=str(self.device)) as f:
            meta = f.metadata() or {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[k] = f.get_tensor(k)
        cache = {k[5:]: v for k, v in tensors.items() if k.startswith("data.")}
        table = {k[5:]: v for k, v in tensors.items() if k.startswith("text.")}
        if "captions" in meta:
            cache["caption"] = json.loads(meta["captions"])
        self._text_table = table or None
        if not self.cfg.quiet and self.rank == 0:
            tqdm.write(f"cached tables read from {path}")
        return cache or None

    @torch.no_grad()
    def _encode_captions(self, captions: list[str] | None) -> dict:
        """Every training caption through the text encoder once: a table of the distinct ones
        (hidden states stored in float16, masks) and, per dataset index, a row of the table.
        Row 0 is the empty prompt (caption dropout)."""
        from tqdm.auto import tqdm

        ds = self.dataset
        if captions is None:
            get = getattr(ds, "caption", None) or (lambda i: ds[i]["caption"])
            captions = [get(i) for i in range(len(ds))]
        distinct = list(dict.fromkeys(["", *captions]))
        row = {c: i for i, c in enumerate(distinct)}
        # Batches of similar length, each padded only to its longest caption (half the cost).
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        length = self.text_encoder.context_length
        hidden = torch.empty(len(distinct), length, self.text_encoder.dim, dtype=torch.float16,
                             device=self.device)  # fmt: skip
        masks = torch.zeros(len(distinct), length, dtype=torch.bool, device=self.device)
        quiet = self.cfg.quiet or self.rank != 0
        for start in tqdm(range(0, len(distinct), 512), desc="encoding captions", disable=quiet):
            idx = order[start : start + 512]
            h, m = self.text_encoder._encode([distinct[i] for i in idx], longest=True)
            hidden[idx] = (h * m[..., None]).to(hidden)  # padding: zeros
            masks[idx] = m.to(masks.device)
        return {
            "hidden": hidden,
            "mask": masks,
            "rows": torch.tensor([row[c] for c in captions], device=self.device),
        }

    def text_context(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, mask) of the batch's captions; dropped ones (drop True) are the empty prompt."""
        if self._text_table is None:
            captions = [
                "" if d else c for d, c in zip(drop.tolist(), batch["caption"], strict=True)
            ]
            return self.text_encoder.encode(captions)
        table = self._text_table
        rows = table["rows"][batch["index"].to(self.device)]
        rows = torch.where(drop, torch.zeros_like(rows), rows)
        return table["hidden"][rows].float(), table["mask"][rows]

    def latents(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        """Images -> scaled latents z ~ q(z | x) * scaling_factor (pixels when there is no VAE)."""
        if self.vae is None:
            return batch["image"]
        from ..models.vae import DiagonalGaussian

        with torch.no_grad():
            if "moments" in batch:
                posterior = DiagonalGaussian(batch["moments"])
            else:
                posterior = self.vae.encode(batch["image"])
            return posterior.sample(g) * self.scaling_factor

    def task_cond(self, batch: dict, g: torch.Generator) -> dict:
        """The network inputs a task adds for this batch, passed to the loss with the class /
        text conditioning: none here; the task trainers' concatenated image (and
        super-resolution's noise level), `tasks.py`. It draws from `g` before anything else in
        `compute_loss` does, so a task's draws never shift the latents' or the dropout's."""
        return {}

    def compute_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        cond = dict(self.task_cond(batch, g))
        x0 = self.latents(batch, g)
        drop = torch.rand((x0.shape[0],), generator=g, device=g.device) < self.cfg.label_dropout
        if self.meta.num_classes:
            null = self.meta.num_classes
            labels = batch["label"]
            cond["class_labels"] = torch.where(drop, torch.full_like(labels, null), labels)
        if self.text_encoder is not None:
            cond["context"], cond["context_mask"] = self.text_context(batch, drop)
        weight = None
        if self._object_rules:  # heavier loss on the pixels of the named objects
            weight = self.dataset.object_weights(self._object_rules, batch["index"], x0.shape[-1])
        if self.cfg.region_captions:  # some two-object images captioned as one of their objects
            region_weight = self._region_captions(batch, drop, cond, x0.shape[-1], g)
            weight = region_weight if weight is None else weight * region_weight
        if weight is not None:
            cond["pixel_weight"] = weight.to(x0.device)
        return self.diffusion_loss(x0, g, **cond).mean()

    def diffusion_loss(self, x0: torch.Tensor, g: torch.Generator, **cond) -> torch.Tensor:
        """Per-example loss of the batch's latents under its conditioning: the denoiser's
        (through self.ddp, see __init__); `training/ddgan.py` puts the GAN's here."""
        return self.denoiser.loss(x0, g, **cond)

    def _region_captions(
        self, batch: dict, drop: torch.Tensor, cond: dict, side: int, g: torch.Generator
    ) -> torch.Tensor:
        """--region-captions: picks images (share P, their captions not dropped) and one of
        their two objects, puts that object's one-object caption in `cond`'s context, and
        returns the loss weights that leave the other object's box out."""
        n = len(drop)
        picked = (torch.rand(n, generator=g, device=g.device) < self.cfg.region_captions) & ~drop
        which = torch.randint(0, 2, (n,), generator=g, device=g.device)
        which = torch.where(picked, which, torch.full_like(which, -1))
        captions, weight = self.dataset.region_captions(batch["index"], which.cpu(), side)
        rows = [i for i, c in enumerate(captions) if c is not None]
        if rows:
            hidden, mask = self.text_encoder.encode([captions[i] for i in rows])
            index = torch.tensor(rows, device=cond["context"].device)
            cond["context"][index] = hidden.to(cond["context"])
            cond["context_mask"][index] = mask.to(cond["context_mask"])
        return weight

    def sample_images(self, n: int = 16) -> torch.Tensor:
        from ..io.model_folder import LoadedModel, build_denoiser
        from ..pipelines.generate import generate

        # Sampling runs on CPU (the pipeline's seeded noise lives there): copies when training
        # on a GPU.
        den = build_denoiser(self.meta, self.ema_state())
        model = LoadedModel(self.meta, self.out, denoiser=den)
        model.vae, model.text_encoder = self.vae, self.text_encoder
        if self.device.type != "cpu":
            model.vae = copy.deepcopy(self.vae).cpu() if self.vae is not None else None
            if self.text_encoder is not None:  # without its (large, on-device) prompt cache
                cache, self.text_encoder._cache = self.text_encoder._cache, {}
                try:
                    model.text_encoder = copy.deepcopy(self.text_encoder).cpu()
                finally:
                    self.text_encoder._cache = cache
        k = self.meta.num_classes
        labels = [i % k for i in range(n)] if k else None
        prompts = None
        if self.text_encoder is not None:
            # captions are plain text, not prompt syntax: a "(" in one is a bracket, not a weight
            prompts = [escape(self.dataset[i]["caption"]) for i in range(n)]
        return generate(model, labels=labels, prompts=prompts, num=n, seed=0, steps=20)

    def save_model(self) -> None:
        super().save_model()
        if self.vae is not None:
            # the model folder is self-contained: its VAE travels with it
            dst = self.out / "vae"
            if not dst.exists():
                skip = shutil.ignore_patterns("checkpoints", "samples")
                shutil.copytree(Path(self.cfg.vae), dst, ignore=skip)


# ----- --init-from: fine-tune a model folder's weights ----------------------------------------
def init_from_folder(model: torch.nn.Module, meta: ModelMeta, folder: str) -> dict:
    """Load a diffusion model folder's (EMA) weights into `model` (built from `meta`) to
    fine-tune them; returns the provenance recorded in the new model.json.

    Every tensor must match in name and shape, with one exception, the SD-inpainting recipe
    (Rombach et al. 2022): a conv_in with more input channels than the source (the concatenated
    mask and masked image of --task inpaint, the low-res image of --task superres) keeps the
    source's kernels for the first channels and zeros for the new ones, so the initial model
    computes exactly what the source did, whatever the extra channels hold (super-resolution's
    noise-level MLP, which no plain model has, keeps its fresh init, and so does a context
    refiner the source lacks, which starts as the identity). The source must
    predict the same target (eps / v / x0) and live in the same space (pixels or latents).
    """
    from ..io.checkpoint import MODEL_WEIGHTS, load_state_strict
    from ..io.model_folder import file_digest, load_model_folder

    src_meta, state = load_model_folder(folder)
    what = f"--init-from {folder}"
    if src_meta.kind != "diffusion":
        raise UserError(f"{what} is a {src_meta.kind!r} model folder, not a diffusion one")
    src_pred = src_meta.parameterization.get("prediction")
    pred = meta.parameterization["prediction"]
    if src_pred != pred:
        raise UserError(f"{what} predicts {src_pred}; this run trains {pred} (--prediction)")
    if (src_meta.latent is None) != (meta.latent is None):
        space = "latents" if src_meta.latent is not None else "pixels"
        raise UserError(f"{what} works on {space}; give the same --vae (or none) as it was trained")
    own = model.state_dict()
    state = dict(state)
    if any(k.startswith("unet.") for k in own) and not any(k.startswith("unet.") for k in state):
        state = {f"unet.{k}": v for k, v in state.items()}  # into a ConcatUNet (tasks)
    conv = "unet.conv_in.weight" if "unet.conv_in.weight" in own else "conv_in.weight"
    w, new = state.get(conv), own.get(conv)
    widened = 0
    if (
        w is not None
        and new is not None
        and w.shape[1] < new.shape[1]
        and (w.shape[0] == new.shape[0] and w.shape[2:] == new.shape[2:])
    ):
        widened = new.shape[1] - w.shape[1]
        state[conv] = torch.cat([w, w.new_zeros(w.shape[0], widened, *w.shape[2:])], 1)
    # modules the source may lack (super-resolution's noise-level MLP, a context refiner)
    # keep their init; both start neutral (the refiner as the identity)
    new_modules = ("noise_level_embedding.", "context_refiner.", "unet.context_refiner.")
    fresh = [k for k in own if k.startswith(new_modules) and k not in state]
    state.update({k: own[k] for k in fresh})
    load_state_strict(model, state, what)
    return {
        "folder": str(Path(folder).resolve()),
        "sha256": file_digest(Path(folder) / MODEL_WEIGHTS),
        "step": (src_meta.training or {}).get("step"),
        "zero_channels": widened,
        "fresh_tensors": len(fresh),
    }

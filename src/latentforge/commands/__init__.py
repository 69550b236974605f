"""The `latentforge` commands, one module per area; `latentforge.cli` assembles them into the
root group and is the entry point. Nothing here imports `latentforge.cli`.

    train.py     train diffusion | vae | lora
    data.py      data pack
    distill.py   distill
    lora.py      lora merge
    generate.py  generate, sample
    edit.py      img2img, inpaint, interpolate
    upscale.py   upscale
    eval.py      eval prompts | digits | superres | fid | vae | inversion | inpaint
    report.py    report trilemma
    features.py  features train-shapes | validate
    bench.py     bench samplers | latent-vs-pixel | unet | generate (defined in benchmarks/)
    sd.py        import, export
    serve.py     serve
    options.py   the options several commands share;  common.py  the helpers they share

Library imports happen inside the command functions, so `latentforge --help` stays quick.
"""

from __future__ import annotations

# the shared options' former home (tests and scripts import them from here)
from .options import guidance_interval_option, layout_option

__all__ = ["guidance_interval_option", "layout_option"]

"""AUTOMATIC1111 interchange: sampler / scheduler names and the `parameters` PNG text chunk.

A1111 writes one `parameters` text chunk (its "infotext"): the prompt (several lines allowed),
then `Negative prompt: ...` (also several lines), then one line of `Key: value` pairs separated
by ", ", a value holding a comma, colon or newline written as a JSON string
(`modules/infotext_utils.py`: `quote` / `parse_generation_parameters`). LoRAs are named in the
prompt itself as `<lora:NAME:SCALE>`. `format_parameters` writes that chunk from latentforge's
own PNG metadata (the keys of `SampleSettings.to_png_meta`, and those the server adds), and
`parse_parameters` / `to_png_meta` read one back, whoever wrote it; keys neither side knows
are kept. Embeddings the prompts use are A1111's `TI hashes: "TRIGGER: HASH, ..."`.

Sampler names: A1111 names a sampler (`Sampler: DPM++ 2M`) and, since v1.9, its noise schedule
apart (`Schedule type: Karras`); older versions fold the schedule into the name
(`DPM++ 2M Karras`). Both read; latentforge's own names read too (case-insensitively), so a
sampler or spacing A1111 lacks (`ipndm`, `optimized`) still round-trips.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import sampling
from ..errors import UserError
from ..schedules import SPACINGS
from .lora import LoraSpec

# A1111 sampler name -> (latentforge sampler, knobs); an entry whose sampler is not registered
# is refused like an unknown name. A1111's "DPM++ SDE", "DPM2 a", "DPM fast", "DPM adaptive",
# "PLMS", "Restart" have no equivalent here.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("euler", {}),
    "Euler a": ("euler_ancestral", {}),
    "LMS": ("lms", {}),
    "Heun": ("heun", {}),
    "DPM2": ("dpm2", {}),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", {}),
    "DPM++ 2M": ("dpmpp_2m", {}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", {}),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", {}),
    "DDIM": ("ddim", {}),
    "DDPM": ("ddpm", {}),
    "UniPC": ("unipc", {}),
    "LCM": ("lcm", {}),
}
# A1111 "Schedule type" -> latentforge spacing (None: the model's default). "Uniform" and
# "SGM Uniform" / "DDIM" pick timesteps of the training schedule as linspace / trailing /
# leading do (Lin et al. 2024, Table 2).
SCHEDULERS: dict[str, str | None] = {
    "Automatic": None,
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "Uniform": "linspace",
    "SGM Uniform": "trailing",
    "DDIM": "leading",
}
# the schedules older A1111 versions fold into the sampler's name ("DPM++ 2M Karras")
_NAME_SUFFIXES = ("Karras", "Exponential")

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
_LORA = re.compile(r"\s*<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
_DIGEST = re.compile(r"[0-9a-f]{16,64}")  # checkpoint.file_digest: 16 hex digits


# ----- names -----------------------------------------------------------------------------------
def _lookup(table: Mapping[str, Any], name: str) -> str | None:
    """The key of `table` equal to `name` ignoring case and "_" for " " ("sgm_uniform", as
    A1111's /schedulers names them), or None."""
    folded = name.strip().replace("_", " ").casefold()
    return next((k for k in table if k.casefold() == folded), None)


def sampler_from_a1111(
    name: str, scheduler: str | None = None
) -> tuple[str, str | None, dict[str, Any]]:
    """(latentforge sampler, spacing or None, knobs) for an A1111 sampler name (old combined
    names such as "DPM++ 2M Karras" too) and schedule type, or latentforge's own names.
    UserError naming the choices for a name with no equivalent."""
    spacing = spacing_from_a1111(scheduler) if scheduler else None
    if name.strip().lower() in sampling.SAMPLERS:
        return name.strip().lower(), spacing, {}
    key = _lookup(SAMPLERS, name)
    if key is None:
        for suffix in _NAME_SUFFIXES:
            base = name.strip()
            if base.casefold().endswith(" " + suffix.casefold()):
                key = _lookup(SAMPLERS, base[: -len(suffix) - 1])
                if key is not None:
                    spacing = spacing or SCHEDULERS[suffix]
                    break
    if key is None or SAMPLERS[key][0] not in sampling.SAMPLERS:
        known = [k for k, (s, _) in SAMPLERS.items() if s in sampling.SAMPLERS]
        raise UserError(
            f"unknown sampler {name!r}; choose one of {sorted(sampling.SAMPLERS)} or the A1111 "
            f"names {known} (optionally with ' Karras' / ' Exponential')"
        )
    sampler, knobs = SAMPLERS[key]
    return sampler, spacing, dict(knobs)


def spacing_from_a1111(name: str) -> str | None:
    """latentforge spacing for an A1111 schedule type ("Karras") or a spacing name; None for
    "Automatic" (the model's default)."""
    if name.strip().lower() in SPACINGS:
        return name.strip().lower()
    key = _lookup(SCHEDULERS, name)
    if key is None:
        raise UserError(
            f"unknown schedule type {name!r}; choose one of {list(SCHEDULERS)} or {list(SPACINGS)}"
        )
    return SCHEDULERS[key]


def sampler_to_a1111(
    sampler: str, spacing: str | None = None, knobs: Mapping[str, Any] | None = None
) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type or None) for a latentforge sampler and spacing:
    latentforge's own names where A1111 has none. Karras / exponential are also folded into
    the name, as older A1111 versions write it ("DPM++ 2M Karras")."""
    knobs = dict(knobs or {})
    matches = [n for n, (s, k) in SAMPLERS.items() if s == sampler and k.items() <= knobs.items()]
    # the most specific match: "DPM++ 2M SDE Heun" over "DPM++ 2M SDE" when solver_type=heun
    name = max(matches, key=lambda n: len(SAMPLERS[n][1]), default=sampler)
    if spacing is None:
        return name, None
    scheduler = next((k for k, v in SCHEDULERS.items() if v == spacing), spacing)
    if scheduler in _NAME_SUFFIXES and name in SAMPLERS:
        name = f"{name} {scheduler}"
    return name, scheduler


# ----- LoRAs in the prompt ---------------------------------------------------------------------
def lora_name_and_scale(spec: str) -> tuple[str, float]:
    """FILE[:SCALE] (`SampleSettings.loras`) -> (the name A1111 tags use: the file's name
    without .safetensors, SCALE); UserError for an unreadable spec."""
    lora = LoraSpec.parse(spec)
    name = lora.path.name
    return name.removesuffix(".safetensors"), lora.scale


def lora_tags(loras: tuple[str, ...] | list[str]) -> str:
    """The prompt suffix A1111 reads LoRAs from: " <lora:NAME:SCALE>" for each."""
    return "".join(f" <lora:{n}:{s:g}>" for n, s in map(lora_name_and_scale, loras))


def extract_loras(prompt: str) -> tuple[str, tuple[str, ...]]:
    """(the prompt without its `<lora:NAME[:SCALE]>` tags, ("NAME:SCALE", ...))."""
    loras = []
    for m in _LORA.finditer(prompt):
        scale = m.group(2)
        try:
            value = float(scale) if scale else 1.0
        except ValueError:
            raise UserError(f"unreadable LoRA tag {m.group(0).strip()!r}") from None
        loras.append(f"{m.group(1)}:{value:g}")
    return _LORA.sub("", prompt).strip(), tuple(loras)


# ----- the parameters chunk ---------------------------------------------------------------------
def quote(value: Any) -> str:
    """A1111's `quote`: a value holding a comma, colon or newline as a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def join_parameters(prompt: str, negative: str, fields: Mapping[str, Any]) -> str:
    """An infotext from its parts (None values left out), exactly as A1111's `create_infotext`."""
    params = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative}\n{params}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """An infotext -> {"Prompt", "Negative prompt", and every `Key: value`} as A1111's
    `parse_generation_parameters` reads it (quoted values unquoted; keys kept as written)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's rule: not a parameters line
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {k: _unquote(v) for k, v in _PARAM.findall(last)}
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    return out


def model_name_and_hash(meta: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(model name, A1111's short hash: the first 10 hex digits of the weights' sha256) from
    latentforge PNG metadata: `generate` records the hash as `model` and the folder as
    `model_path`; the server records the name as `model` and the hash as `model_sha256`."""
    model = str(meta.get("model") or "")
    digest = str(meta.get("model_sha256") or "")
    if _DIGEST.fullmatch(model):
        digest, model = model, Path(str(meta.get("model_path") or "")).name or "default"
    return model or None, digest[:10] or None


def format_parameters(meta: Mapping[str, Any]) -> str | None:
    """The A1111 `parameters` chunk for latentforge PNG metadata (values as `to_png_meta` or
    the server writes them), or None when it records no generation (no seed)."""
    if meta.get("seed") in (None, ""):
        return None
    loras = meta.get("loras") or ()
    if isinstance(loras, str):
        loras = json.loads(loras) if loras else ()
    knobs = meta.get("options") or meta.get("knobs") or {}
    if isinstance(knobs, str):  # to_png_meta's JSON, or the server's "k=v,k=v"
        knobs = json.loads(knobs) if knobs.startswith("{") else {}
    sampler, scheduler = (None, None)
    if meta.get("sampler"):
        sampler, scheduler = sampler_to_a1111(meta["sampler"], meta.get("spacing") or None, knobs)
    name, digest = model_name_and_hash(meta)
    width, height = meta.get("width"), meta.get("height")
    num = int(meta.get("num") or 1)
    fields = {
        "Steps": meta.get("steps") or None,
        "Sampler": sampler,
        "Schedule type": scheduler,
        "CFG scale": _number(meta.get("guidance")),
        "Seed": meta["seed"],
        "Size": f"{width}x{height}" if width not in (None, "") and height else None,
        "Model hash": digest,
        "Model": name,
        "Denoising strength": _number(meta.get("strength")),
        "Batch size": num if num > 1 else None,
        "TI hashes": ", ".join(_embedding_hashes(meta.get("embeddings"))) or None,
    }
    prompt = str(meta.get("prompt") or "") + lora_tags(tuple(loras))
    return join_parameters(prompt.strip(), str(meta.get("negative") or ""), fields)


def _embedding_hashes(records: Any) -> list[str]:
    """Recorded embeddings ("TRIGGER:HASH", a list or its JSON) -> A1111's "TRIGGER: HASH"."""
    if isinstance(records, str):
        records = json.loads(records) if records else ()
    return [": ".join(str(r).rsplit(":", 1)) for r in records or ()]


def _number(value: Any) -> Any:
    """7.0 -> "7" as A1111 writes a float that is whole; None and "" -> None."""
    if value in (None, ""):
        return None
    number = float(value)
    return f"{number:g}" if number.is_integer() else str(number)


def to_png_meta(params: Mapping[str, str], where: str = "PNG") -> dict[str, str]:
    """Parsed A1111 parameters (`parse_parameters`) -> latentforge PNG metadata (the keys
    `SampleSettings.from_png_meta` reads, plus the prompt); UserError naming `where` for a
    value that does not read."""
    prompt, loras = extract_loras(params.get("Prompt", ""))
    out = {"prompt": prompt, "negative": params.get("Negative prompt", "")}
    if loras:
        out["loras"] = json.dumps(list(loras))
    if params.get("TI hashes"):  # "TRIGGER: HASH, ..."
        records = [e.strip().replace(": ", ":") for e in params["TI hashes"].split(",")]
        out["embeddings"] = json.dumps([e for e in records if e])
    try:
        if "Sampler" in params:
            sampler, spacing, knobs = sampler_from_a1111(
                params["Sampler"], params.get("Schedule type")
            )
            out.update(sampler=sampler, spacing=spacing or "")
            if knobs:
                out["options"] = json.dumps(knobs, sort_keys=True)
        for key, ours, kind in (("Steps", "steps", int), ("Seed", "seed", int),
                                ("CFG scale", "guidance", float), ("Batch size", "num", int),
                                ("Denoising strength", "strength", float)):  # fmt: skip
            if params.get(key):
                out[ours] = str(kind(params[key]))
        if params.get("Size"):
            width, _, height = params["Size"].partition("x")
            out.update(width=str(int(width)), height=str(int(height)))
    except (UserError, ValueError) as e:
        raise UserError(f"{where}: unreadable A1111 parameters ({e})") from None
    return out

"""Model files from outside: every damaged or hostile model.json, safetensors header, config.json
or single file is one line (a UserError; exit 2 on the CLI) before any tensor is allocated, and
`export --format single-file` either round-trips through `import` or refuses by name."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentforge.errors import UserError
from latentforge.io.checkpoint import load_tensors
from latentforge.io.lazy import check_float_weights, lazy, open_safetensors
from latentforge.io.model_folder import (
    ModelMeta,
    default_model_dir,
    load_diffusion_model,
    read_model_meta,
)

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
DEFAULT = json.loads((default_model_dir() / "model.json").read_text())


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "latentforge", *argv], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("latentforge: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def _changed(path: tuple, value) -> dict:
    raw = copy.deepcopy(DEFAULT)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


# --------------------------------------------------------------------------- model.json


@pytest.mark.parametrize(
    "text, needle",
    [
        (b"[]", "model.json must be an object, got a list"),
        (json.dumps(_changed(("data", "resolution"), 100000)).encode(), "resolution must be"),
        (b'{"kind": "\xff\xfe"}', "unreadable"),
    ],
    ids=["list", "resolution-100000", "bad-utf8"],
)
def test_bad_model_json_from_outside(tmp_path, text, needle):
    """`latentforge generate` on a damaged folder: one line, exit 2 (model.json is read first,
    so no weights are needed to show it)."""
    (tmp_path / "model.json").write_bytes(text)
    r = _cli("generate", "a red circle", "--model", str(tmp_path), "--out", str(tmp_path / "x.png"))
    _one_line_error(r, needle)
    assert not (tmp_path / "x.png").exists()


BAD_FIELDS = [
    (("data", "resolution"), -16, r"resolution must be an integer in \[1, 4096\]"),
    (("data", "resolution"), 17, "not a multiple of 4, the U-Net's downsampling factor"),
    (("data", "channels"), 3, "U-Net takes 4 channels and gives 4, but data.channels is 3"),
    (("latent", "image_resolution"), 100000, "image_resolution must be an integer in"),
    (("latent", "image_resolution"), 48, "times a power of two"),
    (("latent", "scaling_factor"), 0, "scaling_factor must be > 0"),
    (("latent", "vae"), "../elsewhere", "sub-folder"),
    (("unet", "in_channels"), 0, r"in_channels must be an integer in \[1, 256\]"),
    (("unet", "block_out_channels"), [100000] * 3, "block_out_channels must be an integer in"),
    (("unet", "block_out_channels"), 5, "block_out_channels must be a list"),
    (("unet", "norm_groups"), 7, "not all multiples of norm_groups 7"),
    (("unet", "num_heads"), 0, "num_heads must be an integer in"),
    (("unet", "num_heads"), 3, "64 channels at level 1 do not split into 3 heads"),
    (("unet", "attention_levels"), [True], "attention_levels must be 3 true/false flags"),
    (("unet", "num_classes"), -3, "num_classes must be an integer in"),
    (("unet", "dropout"), 2.0, "dropout must be >= 0 and <= 0.99"),
    (("unet", "foo"), 1, "unknown U-Net config keys"),
    (("unet", "cross_attention_dim"), None, "a text encoder, but the U-Net has no"),
    (("text_encoder", "max_length"), -1, r"max_length must be an integer in \[1, 512\]"),
    (("text_encoder", "type"), "t5", "text_encoder.type 't5' is not one of"),
    (("sampling", "guidance"), float("nan"), "guidance must be a finite number"),
    (("sampling", "guidance"), float("inf"), "guidance must be a finite number"),
    (("sampling", "steps"), 10**9, r"steps must be an integer in \[1, 10000\]"),
    (("sampling", "guidance_interval"), [2.0, 1.0], "0 <= LO < HI"),
    (("parameterization", "num_timesteps"), "x", "num_timesteps must be an integer"),
    (("parameterization", "beta_schedule"), "exp", "beta_schedule 'exp' is not one of"),
    (("parameterization", "prediction"), "noise", "prediction 'noise' is not one of"),
    (("parameterization", "beta_start"), 2, "beta_start must be > 0 and <= 0.999"),
    (("parameterization", "type"), "zzz", "parameterization.type 'zzz' is not one of vp, edm"),
    (("source",), json.loads("[" * 200 + "]" * 200), "nested more than 64 levels"),
    (("kind",), None, "model kind None is not one of"),
]


@pytest.mark.parametrize("path, value, message", BAD_FIELDS, ids=lambda v: str(v)[:30])
def test_bad_model_json_fields_are_one_line(path, value, message):
    with pytest.raises(UserError, match=message) as e:
        ModelMeta.from_json(_changed(path, value), "folder")
    assert "\n" not in str(e.value) and str(e.value).startswith("folder")


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "must be an object, got null"),
        ({"kind": "diffusion"}, "no 'unet' section"),
        (
            {
                "kind": "vae",
                "vae": {"block_out_channels": []},
                "data": {"resolution": 8, "channels": 3},
            },
            "block_out_channels must be a list of 1 to 8",
        ),
        (
            {"kind": "vae", "vae": {}, "data": {"resolution": 10, "channels": 3}},
            "not a multiple of the VAE's downsampling factor 4",
        ),
        (
            {
                "kind": "vae",
                "vae": {},
                "data": {"resolution": 8, "channels": 3},
                "latent_rgb": [[0.1] * 5] * 2,
            },
            "latent_rgb must be 3 rows of 5 numbers",
        ),
    ],
)
def test_whole_model_json_shapes(raw, message):
    with pytest.raises(UserError, match=message):
        ModelMeta.from_json(raw)


def test_activation_size_guard():
    """Each field in range, together 16 GiB for one image's first U-Net level: refused."""
    raw = _changed(("unet", "block_out_channels"), [256, 64, 64])
    raw["data"]["resolution"] = raw["latent"]["image_resolution"] = 4096
    with pytest.raises(UserError, match="256 channels at 4096x4096 are 16 GiB per image"):
        ModelMeta.from_json(raw)


def test_json_limits_and_every_embedded_folder_pass(tmp_path):
    (tmp_path / "model.json").write_text('{"kind": "diffusion", "version": 1' + "0" * 5000 + "}")
    with pytest.raises(UserError, match="invalid JSON"):
        read_model_meta(tmp_path)
    for folder in ("default", "default/vae", "upscaler"):
        read_model_meta(default_model_dir().parent / folder)
    for folder in ("class-pixel", "text-latent", "text-latent/vae", "superres", "inpaint"):
        read_model_meta(LEGACY / folder)


def test_vae_folder_must_fit_the_latents(tmp_path):
    """Checked on load, before a weight is read: the VAE's factor against model.json's sizes."""
    folder = tmp_path / "m"
    shutil.copytree(LEGACY / "text-latent", folder)
    raw = json.loads((folder / "model.json").read_text())
    raw["latent"]["image_resolution"] = 32  # 8 latents -> 32 pixels is f=4; this VAE has f=2
    (folder / "model.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"factor 2 .* needs 4, 4 and 3"):
        load_diffusion_model(folder)


# --------------------------------------------------------------------------- safetensors headers


def _raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + head + data)
    return path


def _w(dtype="F32", shape=(4,), offsets=(0, 16)) -> dict:
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


HEADERS = {
    "deep-nesting": (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "negative-shape": (_w(shape=(-2, -2)), "not a list of non-negative integers"),
    "float-shape": (_w(shape=(2.5, 2)), "not a list of non-negative integers"),
    "product-overflows": (_w(shape=(2**62, 2**62, 4)), "more bytes than the"),
    "product-past-file": (_w(shape=(10**6, 1000)), "more bytes than the"),
    "offsets-out-of-range": (_w(offsets=(100, 116)), "data offsets do not match"),
    "negative-offsets": (_w(offsets=(-16, 0)), "data offsets do not match"),
    "header-length-past-file": (_w(), "header length 1000000000 out of range"),
    "unknown-dtype": (_w(dtype="Q7"), "unknown dtype 'Q7'"),
    "metadata-not-strings": ({"__metadata__": {"a": 1}, **_w()}, "__metadata__ is not a map"),
    "not-an-object": (b"[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_safetensors_header_attacks(tmp_path, name):
    header, message = HEADERS[name]
    length = 10**9 if name == "header-length-past-file" else None
    path = _raw(tmp_path / f"{name}.safetensors", header, b"\0" * 16, length)
    with pytest.raises(UserError, match=message) as e:
        open_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    # the eager reader (training checkpoints, load_model_folder) refuses them too, in one line
    with pytest.raises(UserError, match="not a readable safetensors file") as e:
        load_tensors(path)
    assert "\n" not in str(e.value)


def test_a_hostile_weights_file_in_a_model_folder_from_outside(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(LEGACY / "class-pixel", folder)
    _raw(folder / "model.safetensors", _w(shape=(-2, -2)), b"\0" * 16)
    r = _cli("generate", "3", "--model", str(folder), "--out", str(tmp_path / "x.png"))
    _one_line_error(r, "model.safetensors: not a readable safetensors file")


# --------------------------------------------------------------------------- integer weights


def test_integer_weights_refused_where_floats_belong():
    state = {"conv.weight": lazy(torch.zeros(2, dtype=torch.int32)),
             "text_model.embeddings.position_ids": lazy(torch.arange(3)[None])}  # fmt: skip
    with pytest.raises(UserError, match=r"conv.weight \(int32\)") as e:
        check_float_weights(state, "U-Net")
    assert "position_ids" not in str(e.value)
    check_float_weights({k: v for k, v in state.items() if "position" in k}, "text encoder")


def _int32(path: Path, key: str | None = None) -> str:
    """Rewrite a safetensors file with one floating tensor (the first, or `key`) as int32."""
    tensors = load_file(path)
    key = key or next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path)
    return key


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_int32_weights_refused_at_import(sd_folder, tmp_path, part):
    from latentforge.io.diffusers_format import import_model

    src = tmp_path / "sd"
    shutil.copytree(sd_folder, src)
    name = "model" if part == "text_encoder" else "diffusion_pytorch_model"
    key = _int32(src / part / f"{name}.safetensors")
    with pytest.raises(UserError, match=rf"{key} \(int32\)") as e:
        import_model(src, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_int32_weights_refused_when_loading_a_folder(native, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(native, folder)
    key = _int32(folder / "model.safetensors")
    with pytest.raises(UserError, match=rf"U-Net: .*{key} \(int32\)"):
        load_diffusion_model(folder)


# --------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    "where, text, message",
    [
        ("unet/config.json", "[]", "must be a JSON object, got list"),
        ("unet/config.json", "null", "must be a JSON object, got NoneType"),
        ("unet/config.json", '{"block_out_channels": 5}', "wrong kind"),
        (
            "unet/config.json",
            '{"layers_per_block": -1, "block_out_channels": [32, 64], '
            '"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": '
            '["UpBlock2D", "UpBlock2D"]}',
            "layers_per_block must be an integer",
        ),
        ("unet/config.json", '{"attention_head_dim": 0}', "num_heads must be an integer"),
        ("vae/config.json", '"vae"', "must be a JSON object, got str"),
        ("vae/config.json", '{"latent_channels": 0}', "latent_channels must be an integer"),
        ("scheduler/scheduler_config.json", "[]", "must be a JSON object, got list"),
        ("scheduler/scheduler_config.json", '{"num_train_timesteps": 0}', "num_timesteps"),
    ],
)
def test_garbage_diffusers_configs(sd_folder, tmp_path, where, text, message):
    from latentforge.io.diffusers_format import import_model

    src = tmp_path / "sd"
    shutil.copytree(sd_folder, src)
    (src / where).write_text(text)
    with pytest.raises(UserError, match=message) as e:
        import_model(src, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_config_json_list_from_outside(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("[]")
    _one_line_error(_cli("import", str(tmp_path / "src"), str(tmp_path / "dst")), "JSON object")


# --------------------------------------------------------------------------- single files


def test_a_file_not_shaped_like_sd_is_refused(tmp_path):
    from latentforge.io.diffusers_format import import_model

    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, tmp_path / "two.safetensors")
    r = _cli("import", str(tmp_path / "two.safetensors"), str(tmp_path / "dst"))
    _one_line_error(r, "unexpected keys in the checkpoint: a, b", "model.diffusion_model.*")
    # SD's prefixes over tensors no SD network has
    junk = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}  # fmt: skip
    save_file(junk, tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="not a Stable Diffusion single file") as e:
        import_model(tmp_path / "junk.safetensors", tmp_path / "dst")
    assert "\n" not in str(e.value) and not (tmp_path / "dst").exists()


def test_export_refuses_what_no_single_file_holds(tmp_path):
    """The embedded default model (MiniLM text, cosine schedule, 8-group norms) and the pixel
    upscaler: refused by name, with the formats that do hold them."""
    out = tmp_path / "sd.safetensors"
    r = _cli("export", str(default_model_dir()), "--format", "single-file", str(out))
    _one_line_error(r, "latent text-to-image model (minilm text encoder)", "a cosine schedule",
                    "group norms of 8 groups", "--format diffusers")  # fmt: skip
    from latentforge.io.diffusers_format import export_model

    with pytest.raises(UserError, match=r"super-resolution model .* no VAE.*model folder itself"):
        export_model(default_model_dir().parent / "upscaler", out, "single-file")
    assert not out.exists()


def _custom_native(native: Path, folder: Path) -> Path:
    """`native` with settings SD's conventions would not guess: v-prediction, 4 heads, another
    latent scale and its own sampling defaults (the weights' shapes are unchanged)."""
    shutil.copytree(native, folder)
    raw = json.loads((folder / "model.json").read_text())
    raw["unet"]["num_heads"] = 4
    raw["parameterization"]["prediction"] = "v"
    raw["latent"]["scaling_factor"] = 0.5
    raw["sampling"] = {"sampler": "euler", "steps": 3, "spacing": "trailing", "guidance": 4.0}
    (folder / "model.json").write_text(json.dumps(raw))
    return folder


def test_single_file_export_import_round_trip(native, tmp_path):
    """export --format single-file, then import: the same description, equal weights, and the
    same images for the same seed (from the model's own defaults)."""
    from latentforge.io.diffusers_format import export_model, import_model
    from latentforge.pipelines.generate import generate

    src = _custom_native(native, tmp_path / "src")
    out = tmp_path / "sd.safetensors"
    export_model(src, out, "single-file")
    info = import_model(out, tmp_path / "back", tokenizer=src / "tokenizer")
    assert not any("assumed" in n for n in info["notes"])  # the file's hints, not SD's guesses
    a, b = read_model_meta(src), read_model_meta(tmp_path / "back")
    for field in ("unet", "parameterization", "data", "latent", "sampling", "text_encoder"):
        assert getattr(a, field) == getattr(b, field), field
    for name in ("model.safetensors", "vae/model.safetensors"):
        x, y = load_file(src / name), load_file(tmp_path / "back" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    images = [
        generate(load_diffusion_model(m), prompts=["a red cat"], num=1, seed=3)
        for m in (src, tmp_path / "back")
    ]
    assert torch.equal(*images)


def test_openclip_single_file_round_trip_keeps_every_layer(sd_folder, tmp_path):
    """SD 2.x files hold OpenCLIP with a last layer SD never uses, which import drops; our own
    export has dropped it already, so a second import must not drop another."""
    from conftest import tiny_clip

    from latentforge.io import ldm
    from latentforge.io.diffusers_format import export_model, import_model, load_unet, load_vae

    text = tiny_clip("gelu", layers=3)
    state = ldm.to_ldm(*load_unet(sd_folder), *load_vae(sd_folder),
                       ldm.canonical_clip_names(text.state_dict()), openclip=True)  # fmt: skip
    save_file({k: v.contiguous() for k, v in state.items() if "position_ids" not in k},
              tmp_path / "sd2.safetensors")  # fmt: skip
    tok = sd_folder / "tokenizer"
    import_model(tmp_path / "sd2.safetensors", tmp_path / "a", tokenizer=tok)
    export_model(tmp_path / "a", tmp_path / "again.safetensors", "single-file")
    import_model(tmp_path / "again.safetensors", tmp_path / "b", tokenizer=tok)
    layers = [json.loads((tmp_path / m / "text_encoder" / "config.json").read_text())
              ["num_hidden_layers"] for m in ("a", "b")]  # fmt: skip
    assert layers == [2, 2]
    x = load_file(tmp_path / "a" / "text_encoder" / "model.safetensors")
    y = load_file(tmp_path / "b" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)

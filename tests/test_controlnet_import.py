"""ControlNet folders (model.json kind "controlnet"), their import from diffusers folders and
original single files, and their export back to diffusers: residuals equal diffusers' own
ControlNetModel on the same tiny random weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_UNET, perturbed
from safetensors.torch import save_file

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.io.controlnet import (
    controlnet_to_single_file,
    default_controlnet,
    export_controlnet,
    import_controlnet,
    is_controlnet,
    load_controlnet,
    save_controlnet,
)
from latentforge.io.diffusers_config import unet_config_from_diffusers
from latentforge.io.model_folder import ModelMeta, read_model_meta
from latentforge.models.controlnet import ControlNet, ControlNetConfig

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def reference():
    """A perturbed tiny diffusers ControlNet (every weight nonzero)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    return perturbed(cn, 5)


@pytest.fixture(scope="module")
def diffusers_dir(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn") / "diffusers"
    reference.save_pretrained(folder)
    return folder


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return (
        x,
        torch.tensor([900.0, 100.0]),
        torch.randn(2, 5, 32, generator=g),
        torch.rand(2, 3, 16, 16, generator=g),
    )


def _residuals_equal(ours: ControlNet, ref, atol: float = 1e-5) -> None:
    x, t, ctx, image = _inputs()
    with torch.no_grad():
        want_down, want_mid = ref(x, t, ctx, image, conditioning_scale=0.9, return_dict=False)
        down, mid = ours(x, t, image, scale=0.9, context=ctx)
    assert len(down) == len(want_down)
    for a, b in zip([*down, mid], [*want_down, want_mid], strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    assert mid.abs().max() > 1e-3  # not the zero residuals of an unperturbed ControlNet


def _tiny_net(seed: int = 0) -> ControlNet:
    torch.manual_seed(seed)
    config = ControlNetConfig(unet=unet_config_from_diffusers(dict(TINY_UNET)),
                              embedding_channels=(8, 16))  # fmt: skip
    return perturbed(ControlNet(config), seed)


# ----- the folder ---------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    net = _tiny_net()
    save_controlnet(net, tmp_path / "cn", preprocess="scribble", base="tiny SD")
    loaded, meta = load_controlnet(tmp_path / "cn", dtype=torch.bfloat16)
    assert meta.kind == "controlnet" and meta.data is None
    assert meta.controlnet["preprocess"] == "scribble" and meta.controlnet["base"] == "tiny SD"
    assert loaded.control_config == net.control_config
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and b.dtype == torch.bfloat16
        torch.testing.assert_close(a.to(torch.bfloat16), b)
    assert not any(p.requires_grad for p in loaded.parameters())
    again = ModelMeta.from_json(meta.to_json())  # written back unchanged
    assert again == meta


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(preprocess="../x"), "preprocess must be a preprocessor name"),
        (lambda c: c.update(preprocess=3), "preprocess must be a string"),
        (lambda c: c.update(embedding_channels=[8, "x"]), "embedding_channels"),
        (lambda c: c.update(embedding_channels=5), "embedding_channels"),
        (lambda c: c.update(conditioning_channels=0), "conditioning_channels"),
        (lambda c: c.update(global_pool="yes"), "global_pool must be true or false"),
        (lambda c: c.update(wings=2), "unknown ControlNet config keys"),
        (lambda c: c["unet"].update(block_out_channels=[30, 64]), "norm_groups"),
        (lambda c: c.pop("unet"), "needs a 'unet' section"),
        (lambda c: c.update(base=["a"]), "base must be a string"),
    ],
)
def test_bad_model_json_is_one_line(tmp_path, change, match):
    save_controlnet(_tiny_net(), tmp_path)
    d = json.loads((tmp_path / "model.json").read_text())
    change(d["controlnet"])
    (tmp_path / "model.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=match) as e:
        load_controlnet(tmp_path)
    assert "\n" not in str(e.value)


def test_kind_checks_and_missing_section(tmp_path, native):
    with pytest.raises(UserError, match="no 'controlnet' section"):
        ModelMeta.from_json({"kind": "controlnet"})
    with pytest.raises(UserError, match="is not a ControlNet"):
        load_controlnet(native)
    save_controlnet(_tiny_net(), tmp_path / "cn")
    with pytest.raises(UserError, match="not a diffusion model"):
        from latentforge.io.model_folder import ModelFolder

        ModelFolder.read(tmp_path / "cn")


def test_sampling_controlnet_names_the_default(native):
    meta = read_model_meta(native)
    assert default_controlnet(native, meta) is None
    named = meta.with_defaults(controlnet="controlnet-scribble")
    again = ModelMeta.from_json(named.to_json())
    assert default_controlnet(native, again) == native / "controlnet-scribble"
    for bad in ("../elsewhere", "/abs", "", 3):
        d = named.to_json()
        d["sampling"]["controlnet"] = bad
        with pytest.raises(UserError, match="controlnet"):
            ModelMeta.from_json(d)


# ----- import and export --------------------------------------------------------------------------
def test_diffusers_folder_import_matches_diffusers(reference, diffusers_dir, tmp_path):
    assert is_controlnet(diffusers_dir)
    info = import_controlnet(diffusers_dir, tmp_path / "cn")
    assert info["format"] == "diffusers" and info["preprocess"] == "none"
    net, meta = load_controlnet(tmp_path / "cn")
    assert meta.source["format"] == "diffusers"
    _residuals_equal(net, reference)


def test_single_file_import_gives_the_same_residuals(reference, diffusers_dir, tmp_path):
    """Our weights renamed to the original layout (control_model.*), written as a single file,
    imported: the same network as the diffusers folder's import."""
    import_controlnet(diffusers_dir, tmp_path / "from_folder")
    net, _ = load_controlnet(tmp_path / "from_folder")
    state = controlnet_to_single_file(net)
    assert "control_model.input_hint_block.6.weight" in state  # conv_out of a 2-level encoder
    assert "control_model.zero_convs.0.0.weight" in state
    assert "control_model.middle_block_out.0.bias" in state
    assert "control_model.input_blocks.1.1.proj_in.weight" in state  # LDM's U-Net names
    # a ControlNet 1.0 file also holds its base model: skipped, with a note
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, tmp_path / "control_scribble.safetensors"
    )
    assert is_controlnet(tmp_path / "control_scribble.safetensors")
    info = import_controlnet(tmp_path / "control_scribble.safetensors", tmp_path / "from_file")
    assert info["format"] == "single-file" and info["preprocess"] == "scribble"
    assert any("base model" in n for n in info["notes"])
    from_file, meta = load_controlnet(tmp_path / "from_file")
    assert meta.controlnet["unet"] == read_model_meta(tmp_path / "from_folder").controlnet["unet"]
    _residuals_equal(from_file, reference)


def test_single_file_errors(tmp_path, diffusers_dir):
    import_controlnet(diffusers_dir, tmp_path / "cn")
    state = controlnet_to_single_file(load_controlnet(tmp_path / "cn")[0])
    state["control_model.stray.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "extra.safetensors")
    with pytest.raises(UserError, match=r"unexpected: stray\.weight"):
        import_controlnet(tmp_path / "extra.safetensors", tmp_path / "out")
    torch.save({"input_hint_block.0.weight": torch.zeros(1)}, tmp_path / "control.pth")
    assert not is_controlnet(tmp_path / "control.pth")  # a pickle is not opened unasked
    with pytest.raises(UserError, match="pickle"):
        import_controlnet(tmp_path / "control.pth", tmp_path / "out2")


def test_bgr_channel_order_is_flipped_at_import(reference, tmp_path):
    bgr = diffusers.ControlNetModel.from_config(
        {**reference.config, "controlnet_conditioning_channel_order": "bgr"}
    )
    bgr.load_state_dict(reference.state_dict())
    bgr.save_pretrained(tmp_path / "bgr")
    info = import_controlnet(tmp_path / "bgr", tmp_path / "cn")
    assert any("bgr" in n for n in info["notes"])
    _residuals_equal(load_controlnet(tmp_path / "cn")[0], bgr.eval())


def test_export_reloads_in_diffusers(reference, diffusers_dir, tmp_path):
    import_controlnet(diffusers_dir, tmp_path / "cn")
    export_controlnet(tmp_path / "cn", tmp_path / "out")
    again = diffusers.ControlNetModel.from_pretrained(tmp_path / "out").eval()
    _residuals_equal(load_controlnet(tmp_path / "cn")[0], again)
    assert list(again.config["conditioning_embedding_out_channels"]) == [8, 16]


def test_cli_import_and_export_detect_controlnets(diffusers_dir, tmp_path, capsys):
    assert main(["import", str(diffusers_dir), str(tmp_path / "cn")]) == 0
    assert "ControlNet" in capsys.readouterr().out
    assert read_model_meta(tmp_path / "cn").kind == "controlnet"
    assert main(["export", str(tmp_path / "cn"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    code = main(["export", "--format", "single-file", str(tmp_path / "cn"), str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "diffusers only" in err

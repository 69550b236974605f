"""Hand-drawn sketches of shapes scenes (shapes/sketch.py): strokes along the outlines of the
scene's objects, each closest to its own shape's outline after the scribble preprocessor."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from latentforge.data import load_dataset
from latentforge.io.images import from_pil
from latentforge.io.lora import denoiser_network
from latentforge.preprocess import preprocess
from latentforge.shapes.scenes import SHAPES, parse_prompt, render_shapes, shapes_record
from latentforge.shapes.sketch import SKETCH_SCALE, control_source, draw_sketch


def _outline(record: dict, obj: dict, shape: str) -> np.ndarray:
    """(H, W) bool: the outline of `obj` drawn as `shape` (the renderer's, one pixel wide)."""
    one = {**record, "objects": [{**obj, "shape": shape}], "background": "black"}
    filled = np.asarray(render_shapes(one).convert("L")) > 75
    return filled & ~ndimage.binary_erosion(filled)


def test_sketches_are_dark_strokes_on_the_outline_of_each_object():
    record = shapes_record(3, seed=0, resolution=128)
    sketch = np.asarray(draw_sketch(record, 128, seed=1).convert("L")).astype(float)
    assert np.median(sketch) > 200 and sketch.min() < 100  # dark ink on light paper
    ink = sketch < (np.median(sketch) + sketch.min()) / 2
    scene = np.asarray(render_shapes(record).convert("RGB")).astype(float)
    background = scene[0, 0]
    objects = np.abs(scene - background).sum(axis=2) > 30
    edge = objects & ~ndimage.binary_erosion(objects)
    # every stroke lies near an outline (wobble + pen), and the whole outline is drawn
    assert ndimage.distance_transform_edt(~edge)[ink].max() < 0.12 * 128
    assert (ndimage.distance_transform_edt(~ink)[edge] < 4).mean() > 0.85
    assert not np.array_equal(sketch, np.asarray(draw_sketch(record, 128, seed=2).convert("L")))
    assert np.array_equal(sketch, np.asarray(draw_sketch(record, 128, seed=1).convert("L")))


def test_each_sketched_object_is_closest_to_its_own_shape_at_its_place():
    ds = load_dataset("shapes:64:40", seed=5)
    hits, n = 0, 0
    for i in range(len(ds)):
        sketch = control_source(ds, i, "scribble")
        assert sketch.size == (64 * SKETCH_SCALE,) * 2
        strokes = np.asarray(preprocess(sketch, "scribble"))[..., 0] > 127
        record = ds.record(i)
        record = {**record, "objects": [
            {**o, "cx": o["cx"] * SKETCH_SCALE, "cy": o["cy"] * SKETCH_SCALE,
             "radius": o["radius"] * SKETCH_SCALE} for o in record["objects"]
        ], "resolution": 64 * SKETCH_SCALE}  # fmt: skip
        yy, xx = np.mgrid[: strokes.shape[0], : strokes.shape[1]]
        for o in record["objects"]:
            near = strokes & (np.hypot(yy - o["cy"], xx - o["cx"]) < 1.4 * o["radius"])
            assert near.sum() > 2 * o["radius"]  # drawn there
            # mean distance of its strokes to each shape's outline at the object's place
            misfit = {s: ndimage.distance_transform_edt(~_outline(record, o, s))[near].mean()
                      for s in SHAPES}  # fmt: skip
            hits += min(misfit, key=misfit.get) == o["shape"]
            n += 1
    assert hits / n >= 0.9, (hits, n)


@pytest.mark.parametrize("kind", ["canny", "none"])
def test_other_preprocessors_read_the_image_itself(kind):
    ds = load_dataset("shapes:32:4")
    assert control_source(ds, 0, kind) is None and ds.control_caption(0, kind) is None
    assert load_dataset("digits").control_source(0, "scribble") is None
    assert load_dataset("digits").control_caption(0, "scribble") is None


def test_sketch_captions_leave_out_what_the_sketch_says():
    ds = load_dataset("shapes:64:40")
    named = 0
    for i in range(len(ds)):
        record, caption = ds.record(i), ds.control_caption(i, "sketch")
        said = parse_prompt(caption)
        assert said["background"] == record["background"] and said["relation"] in (None, "and")
        with_shapes = [{"shape": o["shape"], "colour": o["colour"]} for o in record["objects"]]
        shape_free = [{"colour": o["colour"]} for o in record["objects"]]
        assert said["objects"] in (with_shapes, shape_free), caption
        named += said["objects"] == with_shapes
        assert caption == ds.control_caption(i, "sketch")  # fixed per scene
    assert 0.25 < named / len(ds) < 0.75  # about half name their shapes (SHAPE_FREE)


@pytest.fixture(scope="module")
def zero_controlnet(tmp_path_factory):
    """A ControlNet for the embedded model as `train controlnet` starts it: zero residuals."""
    from latentforge.io.controlnet import save_controlnet
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.models.controlnet import ControlNet, ControlNetConfig

    unet = denoiser_network(load_diffusion_model(None))
    config = ControlNetConfig(unet.config, embedding_channels=(16, 32, 64))
    folder = tmp_path_factory.mktemp("cn") / "controlnet"
    save_controlnet(ControlNet.from_unet(unet, config), folder, preprocess="scribble")
    return folder


def test_eval_control_with_a_zero_controlnet_is_the_baseline(zero_controlnet, tmp_path, capsys):
    from latentforge import cli

    out = tmp_path / "figure.png"
    argv = ["eval", "control", "--controlnet", str(zero_controlnet), "--n", "3", "--steps", "2",
            "--batch", "2", "--figure", str(out), "--json", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    # zero residuals: the steered images are the prompt-alone ones, whatever the sketch, once
    # both run without the layout planner (which a ControlNet turns off: the sketch is the
    # layout; the evaluator's baseline is the model as it runs, planner on)
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.shapes.control_eval import evaluate_control

    plain = evaluate_control(load_diffusion_model(None), controlnet=zero_controlnet, n=3,
                             batch=2, steps=2, layout="none", progress=False)  # fmt: skip
    assert plain["control"] == plain["baseline"]
    assert plain["wrong_sketch"]["shape_follows_prompt"] == plain["baseline"]["shape"]
    assert result["ground_truth"]["all"] == 1.0  # the analyser reads the scenes themselves
    assert result["preprocess"] == "scribble" and result["n"] == 3
    assert Image.open(out).size[0] > 400
    argv = ["eval", "control", "--controlnet", str(zero_controlnet), "--data", "digits"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "latentforge: error: eval control needs an RGB model and shapes data; the data is "
        "'digits' (pass --data shapes[:RES])"
    ]


def test_the_default_model_ships_a_scribble_controlnet():
    from latentforge.io.controlnet import default_controlnet, load_controlnet
    from latentforge.io.model_folder import load_diffusion_model
    from latentforge.pipelines.control import Control
    from latentforge.pipelines.generate import generate

    model = load_diffusion_model(None)
    folder = default_controlnet(model.path, model.meta)
    assert folder is not None and folder.name == "controlnet-scribble"
    assert (folder / "model.safetensors").stat().st_size < 4 * 2**20  # fp16, a few MB
    net, meta = load_controlnet(folder)
    assert meta.controlnet["preprocess"] == "scribble"
    assert net.control_config.unet == denoiser_network(model).config
    # it steers: a sketch changes the image the prompt alone gives
    sketch = draw_sketch(shapes_record(0, seed=1), 128, seed=0)
    control = (from_pil(preprocess(sketch, "scribble")) + 1) / 2
    plain = generate(model, prompts=["a red star"], num=1, seed=0, steps=2)
    steered = generate(model, prompts=["a red star"], num=1, seed=0, steps=2,
                       controls=[Control(net, control)])  # fmt: skip
    assert (steered - plain).abs().max() > 0.1

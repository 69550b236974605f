"""Regional prompting: the blend of RegionalDenoiser and the shapes layout planner."""

import pytest
import torch

from latentforge.errors import UserError
from latentforge.guidance import Region, RegionalDenoiser
from latentforge.pipelines.layout import plan_layout
from latentforge.shapes.layout import shapes_layout
from latentforge.shapes.scenes import POSITIONS, parse_prompt


class _Recorder(torch.nn.Module):
    """D(x, sigma, context) = x + sum of the context's first feature: each context gives a
    distinct constant, so a blend can be read off exactly."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, sigma, *, context, context_mask=None):
        self.batches.append(x.shape[0])
        return x + context[:, :, 0].sum(1).view(-1, 1, 1, 1)


def test_regional_denoiser_blends_box_by_box_in_one_call():
    inner = _Recorder()
    den = RegionalDenoiser(inner)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    context = torch.tensor([[[1.0], [0.0]], [[7.0], [0.0]]])  # (B, T, D): 1 and 7
    region_context = torch.tensor([[[[10.0], [0.0]], [[20.0], [0.0]]], [[[0.0]] * 2] * 2])
    weight = torch.zeros(2, 2, 4, 4)
    weight[0, 0, :, :2] = 1  # region 0: columns 0-1
    weight[0, 1, :, 1:3] = 1  # region 1: columns 1-2 (column 1 shared, column 3 in neither)
    out = den(x, torch.tensor(1.0), context=context, region_context=region_context,
              region_weight=weight)  # fmt: skip
    assert inner.batches == [3]  # image 1 plain, image 0's two regions: one call
    offset = out - x
    assert torch.allclose(offset[0, :, :, 0], torch.full((3, 4), 10.0))
    assert torch.allclose(offset[0, :, :, 1], torch.full((3, 4), 15.0))  # the two, averaged
    assert torch.allclose(offset[0, :, :, 2], torch.full((3, 4), 20.0))
    assert torch.allclose(offset[0, :, :, 3], torch.full((3, 4), 15.0))  # outside: the mean
    assert torch.allclose(offset[1], torch.full((3, 4, 4), 7.0))  # no regions: its context
    # without region keys it is the inner denoiser
    assert torch.equal(den(x, torch.tensor(1.0), context=context), inner(x, 1.0, context=context))


def test_regional_denoiser_weights_are_normalised():
    den = RegionalDenoiser(_Recorder())
    x = torch.zeros(1, 1, 1, 2)
    region_context = torch.tensor([[[[10.0]], [[20.0]]]])
    weight = torch.tensor([[[[3.0, 0.5]], [[1.0, 0.5]]]])
    out = den(x, torch.tensor(1.0), context=torch.zeros(1, 1, 1),
              region_context=region_context, region_weight=weight)  # fmt: skip
    assert torch.allclose(out.flatten(), torch.tensor([12.5, 15.0]))


def _cell(region: Region) -> str:
    x0, y0, x1, y1 = region.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return POSITIONS[min(int(cy * 3), 2) * 3 + min(int(cx * 3), 2)]


@pytest.mark.parametrize(
    ("prompt", "prompts", "cells"),
    [
        ("a small red circle in the top left and a large blue square in the bottom right "
         "on a green background",
         ["a small red circle in the top left on a green background",
          "a large blue square in the bottom right on a green background"],
         ["top left", "bottom right"]),
        ("a small red circle above a blue square",  # positions chosen to fit "above"
         ["a small red circle in the top on a gray background",
          "a blue square in the bottom on a gray background"],
         ["top", "bottom"]),
        ("a purple star in the right right of a white triangle on a yellow background",
         ["a purple star in the right on a yellow background",
          "a white triangle in the left on a yellow background"],
         ["right", "left"]),
        ("crimson disc left of an azure box, black backdrop",  # the synonym templates
         ["a red circle in the left on a black background",
          "a blue square in the right on a black background"],
         ["left", "right"]),
    ],
)  # fmt: skip
def test_shapes_layout_gives_one_region_per_object(prompt, prompts, cells):
    regions = shapes_layout(prompt)
    assert [r.prompt for r in regions] == prompts
    # each box sits on its object's cell, and holds no other object's cell centre
    assert [_cell(r) for r in regions] == cells
    for r in regions:
        centres = [((2 * (c % 3) + 1) / 6, (2 * (c // 3) + 1) / 6) for c in range(9)]
        inside = [POSITIONS[c] for c, (cx, cy) in enumerate(centres)
                  if r.box[0] <= cx <= r.box[2] and r.box[1] <= cy <= r.box[3]]  # fmt: skip
        assert inside == [_cell(r)]
    # every region prompt reads back as the one object it names, on the prompt's background
    for r, want in zip(regions, parse_prompt(prompt)["objects"], strict=True):
        got = parse_prompt(r.prompt)["objects"]
        assert len(got) == 1 and all(got[0][k] == v for k, v in want.items())


@pytest.mark.parametrize(
    "prompt",
    ["a red circle in the top left on a blue background", "", "a cat and a dog",
     "a red circle in the left and a blue star in the left",  # one object, none, one cell
     "a red and a blue square"],  # an object without a shape
)  # fmt: skip
def test_shapes_layout_leaves_prompts_it_cannot_split(prompt):
    assert shapes_layout(prompt) == [] and plan_layout("none", prompt) == []


def test_bad_regions_and_layouts_are_clear_errors():
    with pytest.raises(UserError, match="X0 Y0 X1 Y1"):
        Region("a red circle", (0.5, 0.0, 0.4, 1.0))
    with pytest.raises(UserError, match="X0 Y0 X1 Y1"):
        Region("a red circle", (0.0, 0.0, 1.5, 1.0))
    with pytest.raises(UserError, match="needs a prompt"):
        Region(" ", (0.0, 0.0, 1.0, 1.0))
    with pytest.raises(UserError, match="unknown layout"):
        plan_layout("boxes", "a red circle")


def test_the_cli_offers_every_layout():
    """--layout lists the planners by hand (the CLI starts without torch): keep it in step."""
    import click

    from latentforge.commands import layout_option
    from latentforge.pipelines.layout import LAYOUTS

    command = layout_option(click.command()(lambda layout: None))
    (option,) = [p for p in command.params if p.name == "layout"]
    assert sorted(option.type.choices) == sorted(LAYOUTS)


def test_region_weight_and_json_round_trip():
    r = Region("a red circle", (0.0, 0.0, 0.5, 0.25))
    w = r.weight(4, 4)
    assert w.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert Region.from_json(r.to_json()) == r

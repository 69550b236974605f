"""Layout planners for regional prompting: which prompt draws which box of the image.

A layout is a list of `guidance.Region`s, each a prompt and a box; `guidance.RegionalDenoiser`
denoises every box under its own prompt. Regions come from the user (`generate --region`) or
from a planner that reads the prompt. Planners are registered by name, so a dataset's wing
brings its own (the shapes wing registers "shapes", the default of the embedded model) and a
user's dataset can plug in the same way: `register_layout("mine", planner)`. A model folder
names its default planner in model.json (`sampling.layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..guidance import Region

Planner = Callable[[str], "list[Region]"]  # prompt -> regions ([] where it has none to offer)

LAYOUTS: dict[str, Planner] = {"none": lambda prompt: []}


def register_layout(name: str, planner: Planner) -> None:
    """Make `planner` the layout called `name` (`--layout NAME`, model.json sampling.layout)."""
    LAYOUTS[name] = planner


def layout_names() -> list[str]:
    return list(LAYOUTS)


def check_layout(name: str) -> str:
    if name not in LAYOUTS:
        raise UserError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return name


def plan_layout(name: str, prompt: str) -> list[Region]:
    """The regions planner `name` reads from `prompt`; [] where it has none to offer."""
    return LAYOUTS[check_layout(name)](prompt)

"""The shapes dataset's wing: grammar and renderer (`scenes`), the dataset and its training
rules (`dataset`), the layout planner (`layout`), and the reader that scores generated images
(`evaluate`).

It imports the generic layers and no generic module imports it. Importing it plugs the
dataset in through the generic registries, as a user's own dataset would: the `shapes` data
spec (`data.register_data_kind`), the "shapes" layout planner
(`pipelines.layout.register_layout`) and the prompt scorer of `report trilemma`
(`metrics.fid_eval.register_prompt_scorer`); the dataset's `control_source` and
`control_caption` hooks draw hand-drawn sketches of its scenes and their prompts (`sketch`).
`latentforge/__init__.py` imports it, so all are there whenever latentforge is.
"""

from ..data import register_data_kind
from ..metrics.fid_eval import register_prompt_scorer
from ..pipelines.layout import register_layout
from . import features as _features  # noqa: F401  (registers `--features shapes`)
from .dataset import SHAPES_KIND
from .evaluate import prompt_hits
from .layout import shapes_layout

register_layout("shapes", shapes_layout)
register_data_kind(SHAPES_KIND)
register_prompt_scorer("shapes", prompt_hits)

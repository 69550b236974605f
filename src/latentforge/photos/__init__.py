"""The photos wing: real photographs that ship inside packages, as the ``photos`` data spec.

Importing it registers the kind (``data.register_data_kind``), as the shapes wing does;
``latentforge/__init__.py`` imports it. The photos come from scikit-image's bundled sample data
(the ``photos`` extra installs it) for training and from scikit-learn's two sample images,
held out for evaluation; ``dataset.PHOTOS`` lists each with its source and licence.
"""

from ..data import register_data_kind
from .dataset import PHOTOS_KIND

register_data_kind(PHOTOS_KIND)

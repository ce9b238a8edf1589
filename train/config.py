"""Kept so that pickles written before the package layout changed still load.

submitit job pickles (``launch``) hold a :class:`Config` by its import path
``train.config.Config``; the schema itself lives in :mod:`train.core.config`.
"""

from train.core.config import *  # noqa: F401,F403
from train.core.config import __all__  # noqa: F401

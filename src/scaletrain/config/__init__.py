"""The config tree (``tree``: typed sections, TOML, overrides) and its
validation (``checks``); import everything from ``scaletrain.config``."""

from scaletrain.config.tree import *  # noqa: F401,F403
from scaletrain.config.tree import _AUTO_KEYS, _FIELD_FOR_KEY, _KEY_FOR_FIELD  # noqa: F401
from scaletrain.config.checks import *  # noqa: F401,F403

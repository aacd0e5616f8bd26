"""Imports every module that registers a config with `align.config.register_config`.

`align.config.config_class_for` imports this module on first use, so a YAML's `algorithm:`
key can name any config registered here. Add each new algorithm module below.
"""

from . import sample  # noqa: F401  (registers "sample")
from . import flow_grpo  # noqa: F401  (registers "flow_grpo")
from . import crd  # noqa: F401  (registers "crd")
from . import gdro  # noqa: F401  (registers "gdro", and "rollout" via align.rollout_store)
from . import nft  # noqa: F401  (registers "nft")
from . import awm  # noqa: F401  (registers "awm")

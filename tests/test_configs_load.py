"""Every YAML under configs/ loads with its registered config class and says how to run it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from align.config import load_any_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The first line of every YAML is the command that runs it (STYLE.md), via the `align` CLI.
COMMAND_MARKER = "align "
# accelerate launcher files (FSDP/DeepSpeed) live in configs/ too but are not align configs:
# they must still open with their command, but are not loaded as experiment configs.
NOT_ALIGN_CONFIG_DIRS = ("accelerate",)

# Algorithm configs register themselves (`@register_config(name)`) when their module is
# imported. `align/configs_all.py` must import every module that registers a config, so that
# importing it here fills the registry; until it exists only the YAMLs' absence is tested.
try:
    importlib.import_module("align.configs_all")
except ModuleNotFoundError as error:
    if error.name != "align.configs_all":
        raise

YAMLS = sorted(p for pattern in ("*.yaml", "*.yml") for p in CONFIG_DIR.rglob(pattern))


def _id(path: Path | None) -> str:
    return "no-yamls" if path is None else str(path.relative_to(CONFIG_DIR))


@pytest.mark.parametrize("path", YAMLS or [None], ids=_id)
def test_config_yaml(path: Path | None):
    if path is None:
        pytest.skip(f"no YAML files under {CONFIG_DIR} yet")
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines[0] if lines else ""
    assert first.startswith("# ") and COMMAND_MARKER in first, (
        f"{path}: first line must be a '# ' comment giving the command that runs it "
        f"(containing {COMMAND_MARKER!r}), got {first!r}"
    )
    if path.relative_to(CONFIG_DIR).parts[0] in NOT_ALIGN_CONFIG_DIRS:
        return
    name, cfg = load_any_config(path)
    assert cfg is not None and name

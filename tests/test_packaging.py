"""Every import of the package and of its tests is declared in pyproject.toml (deptry, configured
under [tool.deptry]): a fresh `pip install -e ".[test]"` can run everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_is_a_declared_dependency(tmp_path):
    pytest.importorskip("deptry", reason="deptry is in the `test` extra: pip install -e '.[test]'")
    report = tmp_path / "deptry.json"
    # first party: the packages, and the tests' own helper modules (tests/*.py, imported by their stem)
    local = ["align", "rewards", "samplers", "eval", "tests", *(p.stem for p in (ROOT / "tests").glob("*.py"))]
    command = [sys.executable, "-m", "deptry", ".", "--json-output", str(report)]
    for name in local:
        command += ["--known-first-party", name]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.is_file(), f"deptry did not run:\n{run.stdout}\n{run.stderr}"
    issues = json.loads(report.read_text())
    # DEP001: not installed by the declared dependencies; DEP003: only installed as a dependency of one
    undeclared = [f"{i['location']['file']}:{i['location']['line']}: {i['error']['message']}"
                  for i in issues if i["error"]["code"] in ("DEP001", "DEP003")]
    assert not undeclared, "imports of packages pyproject.toml does not declare:\n" + "\n".join(undeclared)


def test_torch_and_torchvision_are_a_matched_pair():
    # a torchvision built for another torch imports, then fails on its compiled ops
    # ("operator torchvision::nms does not exist"); pip resolving both in one command avoids it
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2], (torch.__version__, torchvision.__version__)

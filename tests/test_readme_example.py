"""The README's examples: its Python ones extracted verbatim and run in a sweep, its YAML blocks validated."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from harness.config import validate_config
from harness.runner import run_sweep
from methods.base import MergeContext

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_module(tmp_path, monkeypatch, marker: str, name: str):
    """The README's ``<!-- example: marker -->`` block as module ``name``, importable."""
    text = README.read_text()
    block = re.search(rf"<!-- example: {marker} -->\n```python\n(.*?)```", text, re.S).group(1)
    assert block.startswith(f"# {name}.py")
    (tmp_path / f"{name}.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.fixture
def example_module(tmp_path, monkeypatch):
    yield readme_module(tmp_path, monkeypatch, "custom-method", "my_methods")
    sys.modules.pop("my_methods", None)
    from methods.base import _METHODS

    _METHODS.pop("magnitude_task_arithmetic", None)


def test_example_by_hand(example_module):
    pre = torch.nn.Linear(2, 2)
    with torch.no_grad():
        pre.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
        pre.bias.zero_()
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[2.0, 1.0], [1.0, 0.5]]))   # tau_a = [[1,0],[0,-0.5]]
        b.weight.copy_(torch.tensor([[1.0, 1.2], [4.0, 1.0]]))   # tau_b = [[0,.2],[3,0]]
        a.bias.zero_()
        b.bias.zero_()
    method = example_module.MagnitudeTaskArithmetic(scaling=0.5, keep=0.5)
    out = method.merge(pre, {"a": a, "b": b}, MergeContext())
    # summed tau = [[1, .2], [3, -.5]]; keep the 2 largest magnitudes (3 and 1)
    assert torch.allclose(out.weight, torch.tensor([[1.5, 1.0], [2.5, 1.0]]))


def test_example_runs_in_a_sweep(example_module, sweep_dict):
    d = dict(sweep_dict, methods=[{"name": "my_methods:MagnitudeTaskArithmetic",
                                   "grid": {"keep": [0.2, 0.5], "scaling": [0.3, 0.6]}},
                                  {"name": "magnitude_task_arithmetic", "label": "by-name",
                                   "params": {"keep": 1.0, "scaling": 0.3}},
                                  {"name": "task_arithmetic", "params": {"scaling": 0.3}}])
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.failed
    assert len([r for r in out.results if r.label == "my_methods:MagnitudeTaskArithmetic"]) == 4
    full = next(r for r in out.results if r.label == "by-name")
    ta = next(r for r in out.results if r.label == "task_arithmetic")
    assert full.metrics["acc/avg"] == pytest.approx(ta.metrics["acc/avg"])  # keep=1 is task arithmetic


@pytest.fixture
def tta_module(tmp_path, monkeypatch):
    yield readme_module(tmp_path, monkeypatch, "tta-method", "my_tta")
    sys.modules.pop("my_tta", None)


def test_tta_example_runs_in_a_sweep(tta_module, sweep_dict):
    """Without steps it is task arithmetic at its initial coefficient; adapting logs its loss per
    step, learns one coefficient per task and checkpoints it in the job's workdir."""
    d = dict(sweep_dict, references=False, methods=[
        {"name": "my_tta:EntropyCoefficients", "label": "frozen", "params": {"steps": 0, "init": 0.3}},
        {"name": "task_arithmetic", "params": {"scaling": 0.3}},
        {"name": "my_tta:EntropyCoefficients", "label": "adapted", "params": {"steps": 12, "batch_size": 8}}])
    out = run_sweep(validate_config(d), quiet=True)
    assert not out.failed
    by = {r.label: r for r in out.results}
    assert by["frozen"].metrics["acc/avg"] == pytest.approx(by["task_arithmetic"].metrics["acc/avg"])
    adapted = by["adapted"]
    assert len(adapted.artifacts["curves"]["tta/loss"]) == 12
    assert set(adapted.artifacts["coefficients"]) == set(d["tasks"])
    assert adapted.artifacts["coefficients"] != {t: 0.3 for t in d["tasks"]}

    state = torch.load(out.output_dir / "work" / adapted.key / "coefficients-tta.pt", weights_only=True)
    assert state["step"] == 12 and state["params"]["coef"].tolist() == list(adapted.artifacts["coefficients"].values())


MY_PACKAGE = '''
from pydantic import Field

from methods import MergeMethod
from methods.base import with_state, float_state


class MyMethod(MergeMethod):
    strength: float = Field(0.5, ge=0.0)

    def merge(self, pretrained, finetuned, ctx):
        return with_state(pretrained, float_state(pretrained))
'''


def test_every_readme_yaml_block_validates(example_module, tmp_path, monkeypatch):
    """Each YAML block of the README is a valid sweep: a whole file as given, a fragment (a
    ``methods:``, ``model:``, ``executor:`` ... block) over an embedded eight-task sweep."""
    import yaml

    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "methods.py").write_text(MY_PACKAGE)
    for var in ("CKPT", "DATA", "HF"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    from tasks.embedded import EMBEDDED_TASKS

    base = {"name": "readme", "tasks": list(EMBEDDED_TASKS)}
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 8
    try:
        for block in blocks:
            d = yaml.safe_load(block)
            validate_config(d if "name" in d else {**base, **d}, "README.md")
    finally:
        for name in ("my_package", "my_package.methods"):
            sys.modules.pop(name, None)


def test_merge_context_docstring_names_every_field():
    """The README sends a method's author to MergeContext's docstring for its fields."""
    import dataclasses

    missing = [f.name for f in dataclasses.fields(MergeContext) if f"``{f.name}" not in MergeContext.__doc__]
    assert not missing

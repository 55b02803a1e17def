"""Code that runs on CUDA must say where each tensor lives: a factory call without `device=` lands on the default
device (the CPU), which CUDA only notices at run time, far from the line at fault (a CPU `torch.Generator` given to
`torch.multinomial` on CUDA logits crashed every GPU run after its last checkpoint). This audit reads the trainer's
source, so the class of bug cannot come back without a test failing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AUDITED = sorted((ROOT / "trainer").rglob("*.py"))
"""The model, loop, loss, sampling, evaluation and checkpoint paths: everything under trainer/."""
FACTORIES = {"Generator", "empty", "zeros", "ones", "full", "arange", "tensor", "rand", "randn", "randint", "eye",
             "linspace"}
"""torch functions that create a tensor (or generator) on the default device unless told otherwise."""


def is_parameter(node: ast.AST) -> bool:
    """`nn.Parameter(...)`: a module's parameter is made where the module is built, as nn.Linear's are (the trainer
    builds on the meta device, shards, then materialises on the rank's device)."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Parameter"


def implicit_device_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) of every `torch.<factory>(...)` without a `device=` keyword, outside `nn.Parameter(...)`."""
    tree = ast.parse(source)
    in_parameter = {id(arg) for node in ast.walk(tree) if is_parameter(node) for arg in node.args}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)) or id(node) in in_parameter:
            continue
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in FACTORIES:
            if not any(k.arg == "device" for k in node.keywords):
                found.append((node.lineno, f"torch.{node.func.attr}"))
    return found


def test_the_audit_finds_what_it_looks_for():
    source = ("import torch\n"
              "g = torch.Generator()\n"
              "ok = torch.Generator(device=x.device)\n"
              "z = torch.zeros(3, dtype=torch.float32)\n"
              "like = torch.zeros_like(z)\n"
              "t = torch.tensor([1], device='cpu')\n"
              "w = nn.Parameter(torch.empty(2, 3))\n")
    assert implicit_device_calls(source) == [(2, "torch.Generator"), (4, "torch.zeros")]


@pytest.mark.parametrize("path", AUDITED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_tensor_and_generator_in_the_trainer_names_its_device(path):
    found = implicit_device_calls(path.read_text())
    assert not found, "\n".join(f"{path.relative_to(ROOT)}:{line}: {call}(...) without device= (give it the device "
                                f"of the data it works with, or device='cpu' where the CPU is meant)"
                                for line, call in found)

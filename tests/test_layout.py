"""The layout's rules, checked on the source with `ast` (nothing imported): each tool imports only raylm/ and
itself, the model is plain PyTorch, and the README's Layout section names every module where it lives."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("raylm", "dataprep", "trainer", "tune")


def modules(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def offending(folder: str, allowed: set[str]) -> list[str]:
    """`file: module` for each import of one of raylm's packages that `folder` may not use."""
    return [f"{path.relative_to(ROOT)}: {name}" for path in modules(folder) for name in sorted(imported(path))
            if name.split(".")[0] in PACKAGES and name.split(".")[0] not in allowed]


def test_each_tool_imports_only_raylm_and_itself():
    assert offending("raylm", {"raylm"}) == []
    assert offending("dataprep", {"raylm", "dataprep"}) == []
    assert offending("trainer", {"raylm", "trainer"}) == []


def test_tune_uses_the_trainers_public_names_only():
    private = [f"{path.relative_to(ROOT)}: {name}" for path in modules("tune") for name in sorted(imported(path))
               if name.startswith("trainer.") and any(part.startswith("_") for part in name.split(".")[1:])]
    assert offending("tune", {"raylm", "trainer", "tune"}) == [] and private == []


def test_the_model_is_plain_pytorch():
    """trainer/model/ imports torch, the standard library and itself: parallelism is applied from outside."""
    outside = [f"{path.relative_to(ROOT)}: {name}" for path in modules("trainer/model") for name in imported(path)
               if name.split(".")[0] in PACKAGES and not name.startswith("trainer.model")
               or name.split(".")[0] in {"ray", "numpy", "pyarrow"} or name.startswith("torch.distributed")]
    assert outside == []


def test_no_test_module_imports_another():
    tests = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    crossing = [f"{path.name}: {name}" for path in (ROOT / "tests").glob("*.py") for name in imported(path)
                if name.split(".")[0] in tests]
    assert crossing == []


def layout_section() -> dict[str, str]:
    """README's Layout block: folder → its text (an entry's continuation lines are indented under it)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n.*?```\n(.*?)```", text, re.S | re.M).group(1)
    entries: dict[str, str] = {}
    for line in block.splitlines():
        head = re.match(r"(\S+/)\s+(.*)", line)
        if head:
            folder = head.group(1)
            entries[folder] = head.group(2)
        else:
            entries[folder] += " " + line.strip()
    return entries


def test_the_readme_layout_names_every_module_in_its_folder():
    """Each folder of Python code is listed, and each of its modules is named (by file stem) in its folder's line,
    so a reader finds a file where the README says it is."""
    entries = layout_section()
    folders = {f"{path.parent.relative_to(ROOT)}/" for package in PACKAGES + ("benchmarks",)
               for path in modules(package) if "__pycache__" not in path.parts}
    assert sorted(folders - set(entries)) == []
    missing = [f"{folder}{path.name}" for folder in sorted(folders) for path in sorted((ROOT / folder).glob("*.py"))
               if path.stem not in {"__init__", "__main__"} and not re.search(rf"\b{path.stem}\b", entries[folder])]
    assert missing == []
    assert [folder for folder in entries if not (ROOT / folder).is_dir()] == []

"""The package's shape: entry points on top of the library, never below it; files stay small.

Entry points (``python -m ldm_lightning.<name>``) parse config and call the library; a library
module that imported one would make the library depend on a command line. Every import is
read with ``ast`` (those inside functions too), so the rule holds without running anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "ldm_lightning"
ENTRY_POINTS = {f"ldm_lightning.{name}" for name in ("train", "sample", "evaluate", "export",
                                                      "plots", "pipeline", "compare")}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the code of ``module``) imports, at any depth of the code;
    ``from a import b`` counts as ``a`` and ``a.b``, relative imports are made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_library_never_imports_an_entry_point() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name not in ENTRY_POINTS:
            found = imports_of(path.read_text(), name, path.name == "__init__.py")
            offenders[name] = sorted(found & ENTRY_POINTS)
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_form_of_import_is_seen() -> None:
    source = (
        "import ldm_lightning.sample\nfrom ldm_lightning import evaluate\n"
        "def f():\n    from ..train import train\n    from . import fid\n"
    )
    found = imports_of(source, "ldm_lightning.callbacks.example")
    assert {"ldm_lightning.sample", "ldm_lightning.evaluate", "ldm_lightning.train",
            "ldm_lightning.callbacks.fid"} <= found
    assert "ldm_lightning.plots" in imports_of("from .. import plots", "ldm_lightning.utils",
                                               is_package=True)


def test_no_file_is_over_400_lines() -> None:
    lengths = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    over = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not over, f"split these files (one concept per module): {over}"


def test_data_and_models_meet_only_through_the_handshake() -> None:
    """No datamodule reaches for the model, no model for the datamodule, through the trainer;
    they meet in ``ldm_lightning.models.connect`` (tests/test_handshake.py)."""
    reach_ins = ("trainer.lightning_module", "trainer.datamodule")
    offenders = {
        path.relative_to(PACKAGE).as_posix(): [r for r in reach_ins if r in path.read_text()]
        for folder in ("data", "models")
        for path in sorted((PACKAGE / folder).rglob("*.py"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}

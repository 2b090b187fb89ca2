"""Print the composed config as a rich tree and save it, resolved, in the run directory."""

from __future__ import annotations

from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

FIRST = ("data", "model", "callbacks", "logger", "trainer", "paths")


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None) -> str:
    """Render ``cfg`` (resolved) with the main groups first; write it to ``save_dir``.

    Writes ``config_tree.log`` (what was printed) and ``config.yaml`` (the resolved config, which
    ``OmegaConf.load`` reads back), so a run directory says exactly what ran.
    """
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    order = [k for k in FIRST if k in cfg] + [k for k in cfg if k not in FIRST]
    for key in order:
        branch = tree.add(str(key), style="bold")
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    console = rich.console.Console(record=True, width=120)
    console.print(tree)
    rendered = console.export_text()
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "config_tree.log").write_text(rendered)
        OmegaConf.save(cfg, save_dir / "config.yaml", resolve=True)
    return rendered

"""Imports point one way: the pure math and the network (``diffusion.core``) know nothing of Lightning, Hydra,
OmegaConf or torchvision (only of the project's error types, plain Python). Every module of the package is found
by walking it, so a new one is checked too."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import diffusion.core

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "torchvision")


def core_modules() -> list[str]:
    found = pkgutil.walk_packages(diffusion.core.__path__, prefix="diffusion.core.")
    return sorted(["diffusion.core", *(module.name for module in found)])


def test_the_walk_finds_the_core_modules():
    modules = core_modules()
    assert {"diffusion.core.schedules", "diffusion.core.unet", "diffusion.core.samplers.ddim"} <= set(modules)
    assert len(modules) >= 17


def test_pure_modules_import_no_framework():
    """Each core module is imported with the frameworks blocked (an import of one raises), in a fresh process."""
    code = (
        "import importlib, sys\n"
        f"for name in {FORBIDDEN!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        f"for module in {core_modules()!r}:\n"
        "    importlib.import_module(module)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# What each part of the package may import of the others: the folders are the layers.
ALLOWED = {
    "core": {"errors"},  # errors.py is plain Python: the error types every layer raises
    "errors": set(),
    "outputs": {"core", "errors"},
    "data": {"core", "outputs", "errors"},
    "settings": {"core", "errors"},
    "training": {"core", "data", "outputs", "errors"},
}


def test_the_layers_import_only_the_layers_below():
    """Every ``import diffusion.X`` / ``from diffusion.X import`` of every module, read from its source."""
    root = Path(diffusion.core.__file__).parents[1]
    wrong = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if len(parts) == 1:  # diffusion/__init__.py
            continue
        layer = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                target = name.split(".")[1] if name.startswith("diffusion.") else None
                if target and target != layer and target not in ALLOWED[layer]:
                    wrong.append(f"{path.relative_to(root)} imports {name}")
    assert set(ALLOWED) >= {p.stem for p in root.iterdir() if p.name != "__init__.py" and p.name != "__pycache__"}
    assert not wrong, wrong

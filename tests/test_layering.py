"""Imports point one way: the pure math and the network (``diffusion.core``) know nothing of Lightning, Hydra,
OmegaConf or torchvision (only of the project's error types, plain Python). Every module of the package is found
by walking it, so a new one is checked too."""

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import diffusion.core
import diffusion.models

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "torchvision")


def core_modules() -> list[str]:
    found = pkgutil.walk_packages(diffusion.core.__path__, prefix="diffusion.core.")
    return sorted(["diffusion.core", *(module.name for module in found)])


def test_the_walk_finds_the_core_modules():
    modules = core_modules()
    expected = {"diffusion.core.schedules", "diffusion.core.networks.unet", "diffusion.core.objectives.edm"}
    assert expected | {"diffusion.core.samplers.ddim"} <= set(modules)
    assert len(modules) >= 22


def assert_imports_with_blocked(modules: list[str], blocked: tuple[str, ...]) -> None:
    """Each of ``modules`` imports in a fresh process in which importing any of ``blocked`` raises."""
    code = (
        "import importlib, sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_pure_modules_import_no_framework():
    """Each core module is imported with the frameworks blocked (an import of one raises), in a fresh process."""
    assert_imports_with_blocked(core_modules(), FORBIDDEN)


# What each part of the package may import of the others: the folders are the layers.
ALLOWED = {
    "core": {"errors", "checks"},  # plain Python: the error types every layer raises, and the checks of a setting
    "errors": set(),
    "checks": {"errors"},
    "outputs": {"core", "errors", "checks"},
    "data": {"core", "outputs", "errors", "checks", "settings"},  # settings: prepare.py, an entry point
    "settings": {"core", "errors", "checks"},
    "models": {"core", "errors", "checks"},  # the model as a checkpoint holds it: no Lightning
    "training": {"core", "data", "models", "outputs", "errors", "checks"},
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


MODELS = sorted(m.name for m in pkgutil.walk_packages(diffusion.models.__path__, "diffusion.models."))


def test_the_models_layer_imports_no_lightning():
    """What sample.py needs to read a checkpoint and sample from it imports without Lightning."""
    assert_imports_with_blocked(MODELS, ("lightning", "pytorch_lightning", "lightning_fabric"))


# Where a formulation's name may be written: its own module. Everywhere else asks the objective what it supports.
OBJECTIVE_NAMES = re.compile(r"""["'](edm|ddpm|flow|eps|x0|v|mu|EDM|DDPM)["']|\btarget\b\s*[!=]=""")


def test_no_module_outside_the_objectives_compares_an_objective_name():
    """No ``== "edm"``, ``target == ...`` or ``isinstance(..., EDM)`` outside diffusion/core/objectives/ (and the
    targets of the DDPM family, whose module is the one place a prediction type is resolved), nor in the entry
    points: a new formulation is a new module, not a new branch in old ones."""
    root = Path(diffusion.core.__file__).parents[2]
    allowed = {"diffusion/core/objectives", "diffusion/core/targets.py", "diffusion/models/hparams.py"}
    wrong = []
    for path in sorted([*root.glob("diffusion/**/*.py"), root / "train.py", root / "sample.py"]):
        where = path.relative_to(root).as_posix()
        if any(where.startswith(a) for a in allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and OBJECTIVE_NAMES.search(ast.unparse(node)):
                wrong.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            is_check = isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance"
            if is_check and re.search(r"\b(EDM|DDPM)\b", ast.unparse(node.args[1])):
                wrong.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, wrong

"""What a `pip install` gets: the example configs inside the wheel, and every package the code
imports declared as a dependency."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent

# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "open_clip": "open_clip_torch", "skimage": "scikit-image", "sklearn": "scikit-learn",
                "yaml": "pyyaml", "mlflow": "mlflow-skinny"}


def _declared() -> set[str]:
    """The dependencies and the optional extras a feature needs (not dev's test tools)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    deps = project["dependencies"] + [d for name, ds in extras.items() if name != "dev" for d in ds]
    return {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("-", "_") for d in deps}


def _imported() -> dict[str, str]:
    """Top-level third-party modules imported anywhere in pipeline/ -> one file importing it."""
    out = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "pipeline":
                    out.setdefault(top, str(path.relative_to(REPO)))
    return out


def test_every_imported_package_is_a_declared_dependency():
    declared = _declared()
    missing = {m: f for m, f in _imported().items() if DISTRIBUTION.get(m, m).lower().replace("-", "_") not in declared}
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"


def test_the_wheel_ships_the_example_configs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "frankensoup-output", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          str(src), "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("frankensoup-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {n for n in names if n.startswith("pipeline/configs/")}
        want = {f"pipeline/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*")
                if p.is_file()}
        assert want and shipped == want
        assert z.read("pipeline/configs/demo.yaml") == (REPO / "configs" / "demo.yaml").read_bytes()
        assert "pipeline/model/configs/frankensoup-demo-vit.json" in names
    assert os.path.islink(REPO / "pipeline" / "configs")  # one copy of each config: the top-level one


def test_a_shipped_config_is_found_by_name(tmp_path, monkeypatch):
    from pipeline.cli import build_parser, _config

    monkeypatch.chdir(tmp_path)  # no configs/ here: what an installed frankensoup sees
    cfg = _config(build_parser().parse_args(["prepare", "--config", "imagenet-vit-b32"]))
    assert cfg.model.name == "ViT-B-32"
    with pytest.raises(Exception, match="nothing.yaml"):
        _config(build_parser().parse_args(["prepare", "--config", "nothing.yaml"]))

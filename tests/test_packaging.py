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
        # the Grafana dashboard and the cluster launcher's YAML ship too, as they are
        assert z.read("pipeline/dashboards/frankensoup.json") == (REPO / "dashboards" / "frankensoup.json").read_bytes()
        assert z.read("pipeline/ray_cluster.yaml") == (REPO / "ray_cluster.yaml").read_bytes()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
        assert "License-Expression: Apache-2.0" in meta and "Project-URL: Paper, https://arxiv.org/abs/2309.08610" in meta
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for link in ("configs", "dashboards", "ray_cluster.yaml"):  # one copy of each file: the top-level one
        assert os.path.islink(REPO / "pipeline" / link)


def test_where_prints_the_shipped_files(capsys):
    from pipeline.cli import main

    assert main(["where"]) == 0
    out = capsys.readouterr().out
    paths = dict(line.split(": ", 1) for line in out.splitlines()[:3])
    assert Path(paths["grafana dashboard"].strip()).read_bytes() == (REPO / "dashboards" / "frankensoup.json").read_bytes()
    assert Path(paths["ray cluster launcher"].strip()).read_bytes() == (REPO / "ray_cluster.yaml").read_bytes()
    assert (Path(paths["example configs"].strip()) / "demo.yaml").is_file()
    assert f"cp {paths['grafana dashboard'].strip()} /tmp/ray/session_latest/metrics/grafana/dashboards/" in out


def test_a_shipped_config_is_found_by_name(tmp_path, monkeypatch):
    from pipeline.cli import build_parser, _config

    monkeypatch.chdir(tmp_path)  # no configs/ here: what an installed frankensoup sees
    cfg = _config(build_parser().parse_args(["prepare", "--config", "imagenet-vit-b32"]))
    assert cfg.model.name == "ViT-B-32-quickgelu"
    with pytest.raises(Exception, match="nothing.yaml"):
        _config(build_parser().parse_args(["prepare", "--config", "nothing.yaml"]))


def _requirements() -> dict:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {(r := Requirement(d)).name.lower().replace("-", "_"): r for d in project["dependencies"]}


def test_the_installed_versions_are_in_the_declared_ranges():
    """The ranges are what the code is tested with: what runs these tests is inside them."""
    from importlib.metadata import version

    outside = {name: (version(name), str(r.specifier)) for name, r in _requirements().items()
               if not r.specifier.contains(version(name), prereleases=True)}
    assert not outside


def _private_uses() -> dict[str, str]:
    """Third-party packages whose private parts (a ``_name`` module or name) the code uses ->
    one file using them, from imports and dotted names in the source (logging configs name them
    as strings)."""
    third_party = set(_imported())
    out = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] in third_party:
                if any(p.startswith("_") for p in node.module.split(".")) or any(
                        a.name.startswith("_") for a in node.names):
                    out.setdefault(node.module.split(".")[0], str(path.relative_to(REPO)))
        for m in re.finditer(r"\b([a-z_]\w*)(?:\.\w+)*\._[a-z]\w*", text):
            if m.group(1) in third_party:
                out.setdefault(m.group(1), str(path.relative_to(REPO)))
    return out


def test_packages_whose_private_parts_are_used_have_an_upper_bound():
    private = _private_uses()
    assert {"ray", "open_clip"} <= set(private)  # console.py's logging config, classifier.py's tower builder
    requirements = _requirements()
    unbounded = {m: f for m, f in private.items()
                 if not any(s.operator in ("<", "<=", "~=", "==") for s in requirements[DISTRIBUTION.get(m, m).lower().replace("-", "_")].specifier)}
    assert not unbounded, f"private modules used without an upper bound on their package: {unbounded}"


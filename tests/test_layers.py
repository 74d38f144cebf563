"""The package's structure, read from its source (AST, nothing imported): imports point down
the layers docs/design.md lists, stages are siblings (the soup reaches the evaluate stage only
through its two factories), and no two modules share a file name."""
from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Lowest first; a module may import its own layer's and lower layers' modules (docs/design.md,
# "Layers"). An entry is a top-level module or a package (all of its modules).
LAYERS = [
    ("foundation", {"errors", "keys", "console", "methodspec", "stages"}),
    ("storage and the mixture contract", {"storage", "mixture"}),
    ("config", {"config"}),
    ("run services", {"layout", "lease", "tracking", "raycluster", "metrics"}),
    ("libraries", {"data", "model"}),
    ("artifacts", {"ingredients", "prepared", "scores", "scoring"}),
    ("report", {"report"}),
    ("stages", {"prepare", "finetune", "evaluate"}),
    ("soup", {"soup"}),
    ("entry points", {"run", "dryrun", "fused", "cli", "__main__", "__init__"}),
]
STAGES = {"prepare", "finetune", "evaluate", "soup"}
# the soup stands on the evaluate stage for exactly two things: its evaluator actors (for the
# Ray pool) and its streaming scorer (for the fused models)
SOUP_REACHES_EVALUATE = {"pipeline.evaluate.actor", "pipeline.evaluate.stream"}


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """The pipeline modules (or packages) ``name`` imports, anywhere in the file (lazy ones too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "pipeline":
                continue
            for alias in node.names:  # `from . import storage` imports the module pipeline.storage
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in ALL or (PACKAGE.parent / Path(*sub.split("."))).is_dir() else base)
    return {f for f in found if f != name}


ALL = modules()


def top(name: str) -> str:
    """The layer entry a module belongs to: its top-level module or package under pipeline."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(name: str) -> int:
    entry = top(name)
    for i, (_, members) in enumerate(LAYERS):
        if entry in members:
            return i
    raise AssertionError(f"{name} is in no layer: add {entry!r} to LAYERS and to docs/design.md")


def test_every_module_has_a_layer():
    for name in ALL:
        layer_of(name)


def test_no_import_runs_upward():
    upward = []
    for name, path in ALL.items():
        for target in imports(name, path):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert upward == []


def test_stages_are_siblings_and_the_soup_reaches_evaluate_only_through_two_factories():
    crossing = collections.defaultdict(set)
    for name, path in ALL.items():
        for target in imports(name, path):
            if top(name) in STAGES and top(target) in STAGES and top(name) != top(target):
                crossing[name].add(target)
    soup_to_evaluate = {t for ts in crossing.values() for t in ts if top(t) == "evaluate"}
    others = {n: ts for n, ts in crossing.items() if top(n) != "soup" or any(top(t) != "evaluate" for t in ts)}
    assert others == {}
    assert soup_to_evaluate <= SOUP_REACHES_EVALUATE, soup_to_evaluate
    assert len([n for n in crossing if top(n) == "soup"]) <= 2, sorted(crossing)


def test_no_two_modules_share_a_file_name():
    """Apart from packages' __init__.py and each stage package's stage.py."""
    names = collections.defaultdict(list)
    for name, path in ALL.items():
        names[path.name].append(name)
    allowed = {"__init__.py"}
    stage_files = [n for n in names.get("stage.py", []) if top(n) in STAGES and n.count(".") == 2]
    shared = {f: ns for f, ns in names.items() if len(ns) > 1 and f not in allowed
              and not (f == "stage.py" and len(stage_files) == len(ns))}
    assert shared == {}


def test_the_checks_see_what_they_check():
    """The walk finds the package, reads relative and lazy imports, and the layers' order binds."""
    assert {"pipeline.cli", "pipeline.soup.stage", "pipeline.mixture"} <= set(ALL)
    soup_stage = imports("pipeline.soup.stage", ALL["pipeline.soup.stage"])
    assert {"pipeline.layout", "pipeline.soup.pool", "pipeline.report.plots"} <= soup_stage  # plots: a lazy import
    assert layer_of("pipeline.soup.pool") > layer_of("pipeline.evaluate.actor") > layer_of("pipeline.mixture")

"""Soup methods added to a finished run: the release's Model Stock and LiNeS rows, and a method
installed from a module outside pipeline/ (an entry point, run through the CLI in a
subprocess), each compute only their own row; ``soup.publish`` publishes another method's
model, and the published Model Stock equals an independent numpy implementation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import EVALUATED_OVERRIDES, TINY_OVERRIDES, clone_output, tiny_config
from pipeline import layout, storage
from pipeline.run import run_all
from test_reference_methods import numpy_model_stock

QUIET = {"log": lambda *_: None}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTH = ("soup.methods.model_stock.enabled=true", "soup.methods.lines.enabled=true",
        "soup.methods.lines.grid=[[0, 0], [0.5, 0.5], [1, 0]]")


@pytest.fixture(scope="module")
def finished(evaluated_demo, tmp_path_factory):
    """A finished run without the two methods (TINY_OVERRIDES switch them off): (cfg, report)."""
    cfg = clone_output(evaluated_demo, tmp_path_factory.mktemp("plugins") / "out", *EVALUATED_OVERRIDES)
    return cfg, run_all(cfg, **QUIET)


def copy_of(finished, dst, *extra):
    cfg, _ = finished
    shutil.copytree(cfg.output_uri, dst)
    return tiny_config(str(dst), *EVALUATED_OVERRIDES, *extra)


def same_rows(before: dict, after: dict, names) -> None:
    for name in names:
        for field in ("val", "id_test", "ood", "beta"):
            assert after["methods"][name][field] == before["methods"][name][field], (name, field)


def test_adding_model_stock_and_lines_computes_only_their_rows_and_publishes_model_stock(finished, tmp_path):
    _, before = finished
    cfg = copy_of(finished, tmp_path / "out", *BOTH, "soup.publish=model_stock")
    report = run_all(cfg, **QUIET)
    soup = storage.read_json(storage.join(cfg.output_uri, "run.json"))["stages"]["soup"]
    # the search and every other row come from the memos: no search evaluation, only new scores
    assert soup["computed"] == 0 and report["evaluations"]["evaluated"] == 0
    assert soup["scores_computed"] > 0
    assert list(report["methods"]) == [*before["methods"]][:4] + ["model_stock", "lines"] + [*before["methods"]][4:]
    same_rows(before, report, before["methods"])
    lines = report["lines"]
    assert report["methods"]["lines"]["val"] == lines["val_by_point"][f"{lines['alpha']:g},{lines['beta']:g}"]
    assert report["methods"]["lines"]["val"] == max(lines["val_by_point"].values())
    assert lines["val_by_point"]["1,0"] == report["methods"]["best_individual"]["val"]
    assert lines["val_by_point"]["0,0"] == report["methods"]["zero_shot"]["val"]

    # the published model is Model Stock's, the reference of the paired tests and the card's subject
    assert report["published"] == "model_stock" and report["mcnemar"]["reference"] == "model_stock"
    done = storage.read_json(storage.join(cfg.output_uri, "soup", "_DONE.json"))
    assert done["published"] == "model_stock" and done["published_val"] == report["methods"]["model_stock"]["val"]
    run = publish_dir(cfg)
    card = open(os.path.join(run, "fused", "README.md")).read()
    assert "soup method **model_stock**" in card and "(`model_stock` is this model)" in card
    assert os.path.exists(os.path.join(run, "beta_mmms.png"))  # no mixture to draw for model_stock: mmms's

    # fused/ equals the paper's formula, computed again in numpy from the checkpoints
    val = report["splits"]["val"]
    order = sorted(report["ingredient_scores"], key=lambda i: -report["ingredient_scores"][i]["val"])
    members = order[:2]
    assert report["model_stock"]["members"] == members and report["model_stock"]["start"] == "zero_shot"
    rows = {r["id"]: r for r in storage.read_json(layout.registry_uri(cfg))["ingredients"]}
    w0 = load_file(os.path.join(cfg.output_uri, "prepare", "zeroshot.safetensors"))
    ws = [load_file(os.path.join(cfg.output_uri, rows[i]["checkpoint"])) for i in members]
    clip = load_file(os.path.join(run, "fused", "open_clip_model.safetensors"))
    head = load_file(os.path.join(run, "fused", "head.safetensors"))
    published = {**{k: v for k, v in clip.items() if k.startswith("visual.")},
                 "head.weight": head["weight"], "head.bias": head["bias"]}
    compared = 0
    for name, tensor in published.items():
        if not np.issubdtype(w0[name].dtype, np.floating):
            continue
        expected, t = numpy_model_stock(w0[name], [w[name] for w in ws])
        assert report["model_stock"]["t"][name] == pytest.approx(t, abs=1e-5), name
        np.testing.assert_allclose(tensor, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        compared += 1
    assert compared == len(report["model_stock"]["t"]) and val in report["splits"]["val"]


def publish_dir(cfg) -> str:
    run_id = storage.read_pointer(layout.latest_pointer(cfg))
    return os.path.join(cfg.output_uri, "soup", run_id)


PLUGIN = '''
    """A soup method that lives outside frankensoup: 3/4 of the best ingredient, 1/4 of the second."""
    import numpy as np
    from pydantic import Field

    from pipeline.methodspec import MethodSettings
    from pipeline.soup.methods import MethodResult, SoupMethod, register


    class TiltSettings(MethodSettings):
        weight: float = Field(0.75, gt=0.5, lt=1, description="the best ingredient's share")


    @register
    class Tilt(SoupMethod):
        name = "tilted_pair"
        summary = "the best two ingredients by val, tilted towards the best"
        Settings = TiltSettings

        def budget(self, soup, n_ingredients, n_components):
            return 1

        def run(self, ctx):
            w = self.options(ctx.soup).weight
            first, second = np.argsort(-np.asarray(ctx.val_accs), kind="stable")[:2]
            beta = np.zeros((ctx.K, ctx.n_components))
            beta[first], beta[second] = w, 1 - w
            (acc,) = ctx.evaluate([beta])
            return MethodResult(beta, acc, f"tilted pair val {acc:.4f}")
'''


def install_plugin(site) -> None:
    """What pip leaves behind for a distribution with an entry point: the module and its dist-info."""
    os.makedirs(site / "frankensoup_tilt-0.1.dist-info")
    (site / "frankensoup_tilt.py").write_text(textwrap.dedent(PLUGIN))
    (site / "frankensoup_tilt-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: frankensoup-tilt\nVersion: 0.1\n")
    (site / "frankensoup_tilt-0.1.dist-info" / "entry_points.txt").write_text(
        "[frankensoup.soup_methods]\ntilted_pair = frankensoup_tilt\n")


def test_an_installed_method_adds_its_row_through_the_cli_and_nothing_else_is_recomputed(finished, tmp_path):
    _, before = finished
    cfg = copy_of(finished, tmp_path / "out")
    site = tmp_path / "site"
    install_plugin(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT])}
    env.pop("RAY_ADDRESS", None)
    args = [a for o in [*TINY_OVERRIDES, *EVALUATED_OVERRIDES, f"output_uri={cfg.output_uri}",
                        "soup.methods.tilted_pair.weight=0.8"] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "soup", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "soup: tilted pair val" in proc.stdout
    report = json.loads(open(os.path.join(publish_dir(cfg), "report.json")).read())
    assert list(report["methods"]) == [*before["methods"], "tilted_pair"]
    assert report["config"]["soup"]["methods"]["tilted_pair"] == {"enabled": True, "weight": 0.8}
    same_rows(before, report, before["methods"])
    beta = np.array(report["methods"]["tilted_pair"]["beta"])
    assert sorted(np.unique(beta).tolist()) == pytest.approx([0.0, 0.2, 0.8])
    # only its mixture was evaluated and only its model scored (val, id_test and each ood set)
    done = storage.read_json(storage.join(cfg.output_uri, "soup", "_DONE.json"))
    assert done["computed"] == 1 and report["evaluations"]["evaluated"] == 1
    assert done["scores_computed"] == len(report["split_sizes"])
    # the same module outside an installation is not found: the setting is refused by name
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "pipeline", "soup", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "soup.methods.tilted_pair: Extra inputs are not permitted" in proc.stderr + proc.stdout

"""notebooks/quickstart.ipynb runs top to bottom and shows the report table and the plots."""
import os

import shutil

import nbformat
from nbclient import NotebookClient

from conftest import EVALUATED_OVERRIDES, TINY_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, monkeypatch, evaluated_demo):
    """The notebook's own cells, top to bottom, on the session's evaluated demo (its settings
    passed through FRANKENSOUP_OVERRIDES, which the notebook appends to its own): run_all reuses
    prepare, finetune and evaluate by their content keys and runs the soup, as a rerun would."""
    nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    shutil.copytree(evaluated_demo.output_uri, tmp_path / "out")
    monkeypatch.setenv("FRANKENSOUP_OUTPUT_URI", str(tmp_path / "out"))
    # the kernel starts its own local Ray (TINY_OVERRIDES hold ray.address=local): never join
    # one another test started
    monkeypatch.setenv("FRANKENSOUP_OVERRIDES", " ".join([*TINY_OVERRIDES, *EVALUATED_OVERRIDES]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| mmms |" in m and "best_individual" in m for m in markdown)
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "fused model, id_test accuracy:" in text
    assert (tmp_path / "out" / "soup" / "LATEST").exists()

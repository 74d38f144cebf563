"""What the command line shows: --version, -q, Ray Data's console logging, and no false
"initialized randomly" warning for the models we create without weights on purpose."""
from __future__ import annotations

import logging
import os

import pytest
import yaml

from pipeline import console
from pipeline.cli import main


@pytest.fixture
def restore_console(monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    yield
    console.configure(console.NORMAL)
    os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"frankensoup {version('frankensoup')}"


def test_quiet_prints_nothing_but_errors(tmp_path, capsys, restore_console):
    from PIL import Image

    (tmp_path / "src" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "cat" / "a.png")
    assert main(["-q", "import-images", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--serial"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["import-images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"), "--serial", "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("frankensoup: error: image folder") and "nowhere" in err


def test_verbosity_sets_ray_and_ray_data_logging(restore_console):
    console.configure(console.NORMAL)
    with open(os.environ["RAY_DATA_LOGGING_CONFIG"]) as f:
        config = yaml.safe_load(f)
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["handlers"]["file"]["filename"] == "ray-data.log"  # Ray Data's own log file stays
    assert console.ray_init_kwargs() == {"logging_level": logging.WARNING, "log_to_driver": True}
    console.configure(console.QUIET)
    with open(os.environ["RAY_DATA_LOGGING_CONFIG"]) as f:
        assert yaml.safe_load(f)["handlers"]["console"]["level"] == "ERROR"
    assert console.ray_init_kwargs() == {"logging_level": logging.ERROR, "log_to_driver": False}
    console.configure(console.VERBOSE)
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ
    assert console.ray_init_kwargs()["logging_level"] == logging.INFO
    # the notice Ray Data logs because its bars are off is dropped; its other warnings are not
    noise = console.RayDataNoise()
    record = logging.LogRecord("ray.data", logging.WARNING, "x", 1, "Progress bars disabled. To enable, ...", None, None)
    other = logging.LogRecord("ray.data", logging.WARNING, "x", 1, "object store is small", None, None)
    assert not noise.filter(record) and noise.filter(other)


def test_creating_a_model_without_weights_does_not_warn(caplog, restore_console):
    import open_clip

    from pipeline.model import factory

    root = logging.getLogger()
    for f in [f for f in root.filters if isinstance(f, console.RandomInitNoise)]:
        root.removeFilter(f)  # as before any `frankensoup` command ran in this process
    caplog.set_level(logging.WARNING)
    open_clip.create_model(factory.DEMO_MODEL, pretrained=None)
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)  # open_clip says it
    caplog.clear()
    console.configure(console.NORMAL)
    open_clip.create_model(factory.DEMO_MODEL, pretrained=None)
    logging.warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another warning"]

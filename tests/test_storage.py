import pytest
import torch

from pipeline import storage


def test_bytes_json_round_trip(storage_root):
    storage.write_bytes(storage.join(storage_root, "a", "b.bin"), b"hello")
    storage.write_json(storage.join(storage_root, "c.json"), {"x": [1, 2]})
    assert storage.read_bytes(storage.join(storage_root, "a", "b.bin")) == b"hello"
    assert storage.read_json(storage.join(storage_root, "c.json")) == {"x": [1, 2]}
    assert storage.listdir(storage_root) == ["a", "c.json"]
    assert not storage.exists(storage.join(storage_root, "missing"))


def test_safetensors_round_trip_with_metadata(storage_root):
    t = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    uri = storage.join(storage_root, "t.safetensors")
    storage.save_tensors(uri, t, {"model_name": "x", "class_names": ["a", "b"]})
    back, meta = storage.load_tensors(uri)
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["b"], t["b"])
    assert meta["model_name"] == "x" and meta["class_names"] == '["a", "b"]'


def test_not_safetensors_is_refused(storage_root):
    uri = storage.join(storage_root, "junk.safetensors")
    storage.write_bytes(uri, b"\x00" * 3)
    with pytest.raises(storage.StorageError, match="junk.safetensors"):
        storage.load_tensors(uri)


def test_publish_verifies_then_moves_pointer(storage_root):
    storage.publish({"f/x.bin": b"abc", "r.json": b"{}"}, storage.join(storage_root, "run1"),
                    storage.join(storage_root, "LATEST"), "run1")
    assert storage.read_pointer(storage.join(storage_root, "LATEST")) == "run1"
    storage.verify(storage.join(storage_root, "run1"))
    # tamper: verification names the file
    storage.write_bytes(storage.join(storage_root, "run1", "f", "x.bin"), b"abd")
    with pytest.raises(storage.StorageError, match="x.bin"):
        storage.verify(storage.join(storage_root, "run1"))


def test_failed_publish_leaves_pointer(storage_root, monkeypatch):
    storage.publish({"x": b"1"}, storage.join(storage_root, "run1"), storage.join(storage_root, "LATEST"), "run1")
    real = storage.write_bytes

    def crash_on_second(uri, data, calls=[]):
        calls.append(uri)
        if len(calls) == 2:
            raise storage.StorageError("injected crash mid-upload")
        return real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_second)
    with pytest.raises(storage.StorageError, match="injected"):
        storage.publish({"a": b"1", "b": b"2"}, storage.join(storage_root, "run2"), storage.join(storage_root, "LATEST"), "run2")
    monkeypatch.undo()
    assert storage.read_pointer(storage.join(storage_root, "LATEST")) == "run1"
    storage.verify(storage.join(storage_root, "run1"))


def test_bad_uris_name_themselves():
    with pytest.raises(storage.StorageError, match="gs://x"):
        storage.resolve("gs://x/y")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes("/nonexistent/frankensoup/file")


# ---- object storage that does not answer ------------------------------------------------

@pytest.fixture
def dead_endpoints():
    """Two endpoints that never answer an S3 request: a closed port, and a listening socket that
    accepts connections and never replies (pyarrow's retries waited minutes on it)."""
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    yield {"closed port": f"http://127.0.0.1:{closed_port}", "silent socket": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    silent.close()


@pytest.mark.parametrize("command", [["run", "--dry-run"], ["soup"]])  # run and every stage pass the same check
def test_unreachable_object_storage_stops_at_once_naming_uri_and_endpoint(dead_endpoints, command, tmp_path):
    import os
    import subprocess
    import sys

    for kind, endpoint in dead_endpoints.items():
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": os.getcwd()}
        # the timeout catches the old behaviour (78-100 s of retries), it is not a speed test
        out = subprocess.run([sys.executable, "-m", "pipeline", *command, "--set", "ray.address=local",
                              "--set", "output_uri=s3://nowhere/run1"], env=env, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 2, (kind, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and out.stdout == "", (kind, out.stdout, out.stderr)
        assert "s3://nowhere/run1" in lines[0] and endpoint in lines[0] and "unreachable" in lines[0], lines


def test_storage_that_answers_passes_the_reachability_check(s3_bucket, tmp_path):
    storage.check_reachable([f"{s3_bucket}/not-yet-written", str(tmp_path), f"{s3_bucket}/other"])

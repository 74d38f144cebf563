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

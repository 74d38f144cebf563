"""import-images on Ray: the same bytes as the plain serial import, bad files refused (nothing
left behind) or skipped and listed, files that are not images listed, progress as images/s."""
from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

from pipeline import storage
from pipeline.data import DataError, read_split
from pipeline.data.images import ProgressLine, import_image_folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from import_images import plain_import  # noqa: E402  (the serial import it replaced)


def encoded(value: int, fmt: str) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(value)
    sink = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(sink, format=fmt)
    return sink.getvalue()


def folder(root, per_class: dict[str, int]) -> str:
    """root/<class>/<i>.png or .JPG (alternating), each image different."""
    k = 0
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            k += 1
            (root / cls / f"{i:03d}.{'png' if i % 2 else 'JPG'}").write_bytes(encoded(k, "PNG" if i % 2 else "JPEG"))
    return str(root)


def split_files(uri: str) -> dict[str, bytes]:
    return {n: open(os.path.join(uri, n), "rb").read() for n in sorted(os.listdir(uri))}


def marker(uri: str) -> dict:
    return json.loads(open(os.path.join(uri, "dataset.json")).read())


def written_content(found: dict) -> dict:
    """A dataset.json without what says when a shard was written (its `version`: the file's
    mtime) or how the import ordered rows (`order`, `shuffle_seed`, `holdout`: recorded by the
    import, not by the bench's plain copy of it)."""
    found = {k: v for k, v in found.items() if k not in ("order", "shuffle_seed", "holdout")}
    found["shards"] = [{k: v for k, v in shard.items() if k != "version"} for shard in found["shards"]]
    return found


def test_parallel_import_writes_the_serial_imports_bytes(tmp_path, ray_local):
    src = folder(tmp_path / "src", {"cat": 13, "dog": 9, "emu": 6})
    opts = {"shuffle_seed": 5, "holdout": 0.25, "rows_per_shard": 4}
    plain_import(src, str(tmp_path / "plain"), holdout_uri=str(tmp_path / "plain-val"), **opts)
    import_image_folder(src, str(tmp_path / "ray"), holdout_uri=str(tmp_path / "ray-val"), **opts)
    import_image_folder(src, str(tmp_path / "here"), holdout_uri=str(tmp_path / "here-val"), parallel=False, **opts)
    for side in ("ray", "here"):
        for suffix in ("", "-val"):
            want, got = split_files(str(tmp_path / f"plain{suffix}")), split_files(str(tmp_path / f"{side}{suffix}"))
            parts = [n for n in want if n.endswith(".parquet")]
            assert len(parts) > 1 and {n: got[n] for n in parts} == {n: want[n] for n in parts}, (side, suffix)
            new = marker(str(tmp_path / f"{side}{suffix}"))
            assert new.pop("bad_files") == [] and new.pop("not_images", []) == []
            assert new["order"] == "shuffled" and new["shuffle_seed"] == 5
            assert written_content(new) == written_content(marker(str(tmp_path / f"plain{suffix}")))
    assert read_split(str(tmp_path / "ray")).num_rows == 21 and read_split(str(tmp_path / "ray-val")).num_rows == 7


def test_a_bad_file_is_refused_leaving_nothing_or_skipped_and_listed(tmp_path, ray_local):
    src = folder(tmp_path / "src", {"cat": 5, "dog": 6})
    (tmp_path / "src" / "dog" / "002.JPG").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "src" / "cat" / "notes.txt").write_text("not an image")
    out, val = str(tmp_path / "out"), str(tmp_path / "val")
    for parallel in (True, False):
        with pytest.raises(DataError, match=r"dog/002\.JPG: cannot decode image.*--skip-bad"):
            import_image_folder(src, out, holdout=0.2, holdout_uri=val, rows_per_shard=2, parallel=parallel)
        assert not storage.exists(out) and not storage.exists(val)
    with pytest.raises(DataError, match="holdout URI must differ"):
        import_image_folder(src, out, holdout=0.2, holdout_uri=out + "/")
    info = import_image_folder(src, out, rows_per_shard=2, skip_bad=True)
    assert info["num_rows"] == 10 and [b["file"] for b in info["skipped_bad"]] == ["dog/002.JPG"]
    on_disk = marker(out)
    assert [b["file"] for b in on_disk["bad_files"]] == ["dog/002.JPG"] and "cannot decode" in on_disk["bad_files"][0]["error"]
    assert on_disk["not_images"] == ["cat/notes.txt"]
    split = read_split(out)
    assert split.num_rows == 10 and split.table.column("label").to_pylist() == [0] * 5 + [1] * 5


def test_cli_reports_progress_skipped_and_ignored_files(tmp_path, ray_local, capsys):
    from pipeline.cli import main

    src = folder(tmp_path / "src", {"cat": 3, "dog": 3})
    (tmp_path / "src" / "dog" / "000.JPG").write_bytes(b"garbage")
    (tmp_path / "src" / "dog" / "readme.md").write_text("hi")
    out = str(tmp_path / "out")
    assert main(["import-images", src, "--out", out]) == 2
    assert "dog/000.JPG: cannot decode image" in capsys.readouterr().err and not storage.exists(out)
    assert main(["import-images", src, "--out", out, "--skip-bad", "--rows-per-shard", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 5 images, 2 classes" in captured.out
    assert "1 files that do not decode, skipped: dog/000.JPG" in captured.err
    assert "1 files that are not images (by extension), ignored: dog/readme.md" in captured.err
    assert "import: 6 / 6 images (" in captured.err and "images/s)" in captured.err


def test_progress_line_is_a_line_every_few_seconds_off_a_terminal():
    stream = io.StringIO()
    line = ProgressLine(stream=stream, every_s=3600)
    for done in (10, 20, 30):
        line(done, 30)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("import: 10 / 30 images (") and lines[-1].startswith("import: 30 / 30")


def test_import_from_and_to_s3_on_ray(tmp_path, s3_bucket, ray_local):
    local = folder(tmp_path / "src", {"cat": 3, "dog": 4})
    (tmp_path / "src" / "dog" / "notes.txt").write_text("not an image")
    src = f"{s3_bucket}/import-src"
    for path in sorted((tmp_path / "src").rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(src, str(path.relative_to(tmp_path / "src"))), path.read_bytes())
    out, val = f"{s3_bucket}/import-out", f"{s3_bucket}/import-val"
    info = import_image_folder(src, out, shuffle_seed=2, holdout=0.3, holdout_uri=val, rows_per_shard=2)
    plain_import(local, str(tmp_path / "plain"), shuffle_seed=2, holdout=0.3, holdout_uri=str(tmp_path / "pval"),
                 rows_per_shard=2)
    assert info["not_images"] == ["dog/notes.txt"] and info["holdout_rows"] == 2
    for remote, here in ((out, tmp_path / "plain"), (val, tmp_path / "pval")):
        assert read_split(remote).table.equals(read_split(str(here)).table)


def test_shortest_side_scales_large_images_down_the_same_way_everywhere(tmp_path, ray_local):
    from PIL import Image

    from pipeline.data import decode_image

    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(src / "cat" / "big.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)).save(src / "cat" / "tall.png")
    small = encoded(7, "PNG")  # 6 x 5: kept as it is
    (src / "cat" / "small.png").write_bytes(small)
    for parallel, out in ((True, "ray"), (False, "here")):
        info = import_image_folder(str(src), str(tmp_path / out), shortest_side=6, parallel=parallel)
        assert info["shortest_side"] == 6
    rows = read_split(str(tmp_path / "ray")).table.column("image").to_pylist()
    assert rows == read_split(str(tmp_path / "here")).table.column("image").to_pylist()
    assert [decode_image(b).size for b in rows] == [(10, 6), (5, 6), (6, 12)]  # big, small, tall
    assert rows[0][:2] == b"\xff\xd8" and rows[2][:4] == b"\x89PNG" and rows[1] == small
    with pytest.raises(DataError, match="shortest_side must be a positive integer"):
        import_image_folder(str(src), str(tmp_path / "x"), shortest_side=0)

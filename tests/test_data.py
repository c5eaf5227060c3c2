"""Data sources on small files the tests make: image folders, tar archives, npz, CIFAR's python format."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common.data import CIFAR10_CLASSES, Examples, load_split, model_inputs
from fedgrpc.common.errors import DataError
from PIL import Image


def write_image_folder(
    root: Path, per_class: int = 2, classes: tuple[str, ...] = ("cat", "airplane", "truck")
) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((8, 8, 3), CIFAR10_CLASSES.index(cls) * 20, np.uint8) + rng.integers(
                    0, 3, (8, 8, 3), dtype=np.uint8
                )
                Image.fromarray(pixels).save(
                    folder / f"{i:04d}.png"
                )  # PNG: lossless, so pixels compare exactly


def test_image_folder_labels_follow_cifar_order(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "imgs")
    train = load_split(str(tmp_path / "imgs"), "train")
    assert train.x.shape == (6, 8, 8, 3) and train.x.dtype == np.uint8
    # airplane=0, cat=1, truck=2 in CIFAR-10's order, not alphabetical order of folder names
    np.testing.assert_array_equal(train.y, [0, 0, 1, 1, 2, 2])
    assert abs(int(train.x[2].mean()) - CIFAR10_CLASSES.index("cat") * 20) <= 2


def test_tar_archive_matches_the_folder_and_is_cached(tmp_path: Path, private_cache: Path) -> None:
    write_image_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname=".")
    from_tar = load_split(str(archive), "test")
    from_dir = load_split(str(tmp_path / "imgs"), "test")
    np.testing.assert_array_equal(from_tar.x, from_dir.x)
    np.testing.assert_array_equal(from_tar.y, from_dir.y)
    cached = sorted(private_cache.glob("imgs-*.npz"))
    assert len(cached) == 2  # one per source
    stamps = [p.stat().st_mtime_ns for p in cached]
    load_split(str(archive), "train")  # served from the cache: nothing decoded or written again
    assert sorted(private_cache.glob("imgs-*.npz")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    with np.load(cached[0], allow_pickle=False) as npz:
        assert set(npz.files) == {"x_train", "y_train", "x_test", "y_test"}


def test_npz_source(synthetic_npz: Path) -> None:
    test = load_split(str(synthetic_npz), "test")
    assert len(test) == 100 and test.x.shape[1:] == (32, 32, 3)


def test_model_inputs_scale_and_one_hot() -> None:
    x, y = model_inputs(Examples(np.full((2, 1, 1, 1), 255, np.uint8), np.array([0, 3], np.uint8)), 4)
    assert x.dtype == np.float32 and x.max() == 1.0
    np.testing.assert_array_equal(y, [[1, 0, 0, 0], [0, 0, 0, 1]])


def cifar_python_archive(path: Path, batch_payload: object | None = None) -> None:
    """A miniature cifar-10-python.tar.gz: the same file names and dict layout, 4 rows per batch."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            payload = batch_payload or {
                b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                b"labels": [1, 2, 3, 4],
                b"batch_label": b"x",
            }
            blob = pickle.dumps(payload, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_official_python_archive_is_read_without_running_code(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    cifar_python_archive(archive)
    train = load_split(str(archive), "train")
    assert train.x.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(train.y[:4], [1, 2, 3, 4])


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned",))


def test_a_booby_trapped_python_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    cifar_python_archive(archive, batch_payload={b"data": _Exploit(), b"labels": []})
    with pytest.raises(DataError, match="refusing to load"):
        load_split(str(archive), "train")


@pytest.mark.parametrize("content", ["missing", "garbage"])
def test_unreadable_sources_say_what_to_pass(tmp_path: Path, content: str) -> None:
    path = tmp_path / "data.bin"
    if content == "garbage":
        path.write_bytes(b"not data")
    with pytest.raises(DataError, match="does not exist|neither a folder"):
        load_split(str(path), "train")

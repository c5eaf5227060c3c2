"""Where training and test images come from.

Sources, picked by `--data` (or the FL_DATA environment variable):

- nothing, or "cifar10": CIFAR-10 through keras.datasets (downloaded once by Keras);
- a folder or tar archive in image-folder layout, `train/<class>/*.jpg|png` and
  `test/<class>/*`, classes in CIFAR-10's label order when they are CIFAR-10's names,
  else sorted (e.g. the offline `cifar10-jpeg.tar.gz`);
- the official `cifar-10-python.tar.gz` (read with an unpickler that builds nothing but
  plain containers and uint8 arrays: no code in the archive can run);
- an `.npz` file with uint8 arrays x_train, y_train, x_test, y_test (no pickle).

Decoding 60,000 JPEGs takes a while, so decoded arrays are cached as an uncompressed
.npz under FEDGRPC_CACHE (default ~/.cache/fedgrpc), keyed by the source's path, size
and modification time; a second start reads only the split it needs, in well under a
second.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast

import numpy as np

from .errors import DataError

Split = Literal["train", "test"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Examples:
    """Images as uint8 (N, H, W, C) and integer labels (N,): compact until training needs floats."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(
                f"expected images (N,H,W,C) and labels (N,), got {self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> Examples:
        return Examples(self.x[indices], self.y[indices])


def model_inputs(examples: Examples, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels scaled to [0, 1] as float32 and one-hot labels, as the reference job feeds Keras."""
    x = examples.x.astype(np.float32)
    x /= 255.0
    y = np.zeros((len(examples), num_classes), dtype=np.float32)
    y[np.arange(len(examples)), examples.y.astype(np.int64)] = 1.0
    return x, y


def describe(source: str | None) -> str:
    return source if source else "CIFAR-10 (keras.datasets download)"


def load_split(source: str | None, split: Split) -> Examples:
    """Load one split of a data source (see the module docstring for what `source` may be)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if not source or source == "cifar10":
        return _from_keras(split)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist (give a folder, .tar.gz or .npz, or 'cifar10')"
        )
    if path.suffix == ".npz":
        return _from_npz(path, split)
    return _from_npz(_cached_decode(path), split)


def load_labels(source: str | None, split: Split) -> np.ndarray:
    """Only the labels of one split (cheap from a cached or .npz source: the images stay on disk)."""
    if not source or source == "cifar10":
        return load_split(source, split).y
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist")
    npz = path if path.suffix == ".npz" else _cached_decode(path)
    try:
        with np.load(npz, allow_pickle=False) as archive:
            return np.asarray(archive[f"y_{split}"]).reshape(-1)
    except KeyError as exc:
        raise DataError(f"{npz} has no y_{split} array") from exc


def _from_keras(split: Split) -> Examples:
    import keras  # heavy import, only when this source is used

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # network or archive trouble, reported with what to do about it
        raise DataError(
            f"could not download CIFAR-10 through Keras ({exc}); pass --data PATH (or FL_DATA) "
            "with a local copy instead"
        ) from exc
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return Examples(np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.uint8).reshape(-1))


def _from_npz(path: Path, split: Split) -> Examples:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return Examples(archive[f"x_{split}"], archive[f"y_{split}"].reshape(-1))
    except KeyError as exc:
        raise DataError(f"{path} has no x_{split}/y_{split} arrays") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from exc


def cache_dir() -> Path:
    return Path(os.environ.get("FEDGRPC_CACHE", Path.home() / ".cache" / "fedgrpc"))


def _cached_decode(path: Path) -> Path:
    """The cache file for an image source, decoding the source first if needed."""
    stat = path.stat()
    key = sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{path.name.split('.')[0]}-{key}.npz"
    if cached.exists():
        return cached
    arrays = _decode_source(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, **cast(dict[str, Any], arrays))
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, cached)  # atomic: concurrent clients never read half a cache file
    return cached


def _decode_source(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        return _image_folder(_folder_files(path))
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path} is neither a folder, a tar archive nor an .npz file")
    with tarfile.open(path) as archive:
        names = archive.getnames()
        if any(PurePosixPath(n).name == "data_batch_1" for n in names):
            return _cifar_python(archive)
        return _image_folder(_tar_files(archive))


def _folder_files(root: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    for file in root.rglob("*"):
        if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
            yield PurePosixPath(file.relative_to(root).as_posix()), file.read_bytes()


def _tar_files(archive: tarfile.TarFile) -> Iterator[tuple[PurePosixPath, bytes]]:
    for member in archive:
        if member.isfile() and PurePosixPath(member.name).suffix.lower() in IMAGE_SUFFIXES:
            handle = archive.extractfile(member)
            if handle is not None:
                yield PurePosixPath(member.name), handle.read()


def _image_folder(files: Iterator[tuple[PurePosixPath, bytes]]) -> dict[str, np.ndarray]:
    """Decode `<prefix>/<split>/<class>/<file>` images into arrays, in a stable order."""
    from PIL import Image

    found: dict[Split, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for name, data in files:
        parts = name.parts
        if len(parts) < 3 or parts[-3] not in found:
            continue
        split: Split = "train" if parts[-3] == "train" else "test"
        found[split].append((parts[-2], parts[-1], data))
    if not found["train"] or not found["test"]:
        raise DataError("expected images under train/<class>/ and test/<class>/; found none for one split")
    classes = sorted({cls for items in found.values() for cls, _, _ in items})
    if set(classes) <= set(CIFAR10_CLASSES):
        classes = [c for c in CIFAR10_CLASSES if c in classes]
    label_of = {cls: i for i, cls in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {}
    for split, items in found.items():
        items.sort(key=lambda item: (label_of[item[0]], item[1]))
        images = []
        for _cls, _name, data in items:
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        shapes = {image.shape for image in images}
        if len(shapes) != 1:
            raise DataError(f"{split} images differ in size: {sorted(shapes)[:3]}...")
        arrays[f"x_{split}"] = np.stack(images)
        arrays[f"y_{split}"] = np.array([label_of[cls] for cls, _, _ in items], dtype=np.uint8)
    return arrays


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batch files while refusing every global but numpy's array rebuilders.

    A pickle can name any importable callable; this one may only name the few that rebuild
    a numpy array, so a tampered archive fails with a DataError instead of running code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3's protocol-2 pickles spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR batch file: not a plain array")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
            return _reconstruct
        return getattr(np, name)


def _cifar_python(archive: tarfile.TarFile) -> dict[str, np.ndarray]:
    """The official python archive: data_batch_1..5 and test_batch, 10,000 rows of 3072 bytes each."""

    def batch(stem: str) -> tuple[np.ndarray, np.ndarray]:
        member = next((m for m in archive.getmembers() if PurePosixPath(m.name).name == stem), None)
        handle = archive.extractfile(member) if member else None
        if handle is None:
            raise DataError(f"the CIFAR-10 python archive has no {stem}")
        content = _ArraysOnlyUnpickler(handle, encoding="bytes").load()
        data = np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(data), np.asarray(content[b"labels"], dtype=np.uint8)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }

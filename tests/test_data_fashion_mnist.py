"""Fashion-MNIST IDX reader: real files, checksums, layouts and error messages."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from dsnet.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist_root,
    load_fashion_mnist,
    read_idx,
)


@pytest.fixture(scope="module")
def fm_root():
    return find_fashion_mnist_root()


def test_test_split_shapes_and_content(fm_root):
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert FASHION_MNIST_CLASSES[labels[0]] == "Ankle boot"
    assert len(FASHION_MNIST_CLASSES) == 10


def test_torchvision_layout_with_uncompressed_files(fm_root, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(gzip.decompress((fm_root / f"{name}.gz").read_bytes()))
    (raw / "train-images-idx3-ubyte.gz").symlink_to(fm_root / "train-images-idx3-ubyte.gz")
    images, labels = load_fashion_mnist("test", root=tmp_path)
    ref_images, ref_labels = load_fashion_mnist("test")
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_checksum_mismatch_names_file_and_md5(fm_root, tmp_path):
    for path in fm_root.iterdir():
        shutil.copy(path, tmp_path / path.name)
    labels = gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    tampered = labels[:-1] + bytes([(labels[-1] + 1) % 10])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(tampered))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*expected MD5 15d484375f8d13e6eb1aabb0c3f46965"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: not a valid gzip file"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val")  # type: ignore[arg-type]


def test_read_idx_rejects_bad_headers():
    good = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert read_idx(good).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(b"\x89PNG....")
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(good[:-1], "x.idx")

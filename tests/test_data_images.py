"""Bad and unusual image files, folder datasets, and the deterministic sharded sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsnet.data.datasets import (
    ImageFolderDataset,
    ShardedEpochSampler,
    TransformedDataset,
    collate_with_bad_files,
)
from dsnet.data.images import ImageLoadError, decode_image, image_format, load_image


def test_grey_rgba_cmyk_16bit_palette_convert_correctly(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "grey.png")
    rgb = load_image(tmp_path / "grey.png")
    assert rgb.mode == "RGB" and rgb.size == (5, 4) and rgb.getpixel((0, 0)) == (77, 77, 77)
    assert load_image(tmp_path / "grey.png", "L").getpixel((0, 0)) == 77

    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black pixel → white background
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (200, 10, 10)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # pure red in CMYK
    red = np.asarray(load_image(tmp_path / "cmyk.jpg"), dtype=int)
    assert red[..., 0].min() > 230 and red[..., 1:].max() < 25

    wide = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # half of the 16-bit range
    wide.save(tmp_path / "grey16.png")
    assert load_image(tmp_path / "grey16.png").getpixel((0, 0)) == (128, 128, 128)  # rescaled, not clipped to 255

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif").getpixel((2, 2)) == (10, 200, 30)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "not an image"),
        ("truncated.png", None, "corrupt or truncated"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
        path.write_bytes((tmp_path / "full.png").read_bytes()[:100])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=rf"{name}.*{reason}|{reason}.*{name}"):
        load_image(path)


def test_truncated_jpeg_is_not_silently_padded(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path)


def test_unreadable_training_file_is_replaced_and_reported(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name / "0.png")
    (tmp_path / "a" / "1.png").write_bytes(b"")  # sorted after 0.png: index 1
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 3

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image).copy())

    train = TransformedDataset(dataset, to_tensor)
    images, targets, bad = collate_with_bad_files([train[i] for i in range(3)])
    assert images.shape == (3, 8, 8, 3) and targets.tolist() == [0, 1, 1]  # index 1 replaced by index 2
    assert len(bad) == 1 and "1.png" in bad[0] and "empty file" in bad[0]

    evaluation = TransformedDataset(dataset, to_tensor, replace_bad=False)
    images, targets, bad = collate_with_bad_files([evaluation[i] for i in range(3)])
    assert images.shape[0] == 2 and targets.tolist() == [0, 1] and len(bad) == 1  # dropped, not replaced


def test_augmentation_depends_on_sample_and_epoch_only():
    class Noise(ImageFolderDataset):
        def __init__(self):
            self.targets, self.classes = [0] * 4, ("x",)

        def load(self, index):
            return Image.new("L", (4, 4), index)

    dataset = TransformedDataset(Noise(), lambda image: torch.rand(3), seed=5)
    first = dataset[(2, 0)][0]
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(dataset[(2, 0)][0], first)
    assert not torch.equal(dataset[(2, 1)][0], first)
    assert not torch.equal(dataset[(3, 0)][0], first)


def test_sharded_sampler_matches_single_process_and_resumes():
    single = ShardedEpochSampler(50, 8, seed=3)
    single.set_epoch(1)
    order = [i for i, _ in single]
    assert len(order) == len(single) == 48 and len(set(order)) == 48  # 6 full updates, the rest dropped
    ranks = [ShardedEpochSampler(50, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(1)
    shards = [[i for i, _ in s] for s in ranks]
    for update in range(6):  # every update sees the same 8 samples, split over the ranks
        together = shards[0][update * 4 : update * 4 + 4] + shards[1][update * 4 : update * 4 + 4]
        assert sorted(together) == sorted(order[update * 8 : update * 8 + 8])
    single.set_epoch(1, start_update=4)
    assert [i for i, _ in single] == order[32:] and len(single) == 16
    single.set_epoch(2)
    assert [i for i, _ in single] != order

    evaluation = [ShardedEpochSampler(11, 4, rank=r, world_size=2, shuffle=False) for r in range(2)]
    seen = sorted(i for s in evaluation for i, _ in s)
    assert seen == list(range(11))  # no sample dropped or repeated
    with pytest.raises(ValueError, match="not divisible"):
        ShardedEpochSampler(10, 3, world_size=2)


# --- decompression bombs and absurd sizes: a per-file error, decided from the header ---------------------------------


def _bomb(path: Path, side: int = 40000) -> Path:
    """A PNG of ``side``×``side`` black pixels that is only a few kB on disk (1-bit, compressed)."""
    from PIL import Image as PILImage

    saved = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None
    try:
        PILImage.new("1", (side, side)).save(path, optimize=True)
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return _bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_decompression_bomb_is_a_per_file_error(bomb):
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageLoadError, match=r"bomb\.png: 40000x40000 = 1600000000 pixels, over the limit"):
        load_image(bomb)
    with pytest.raises(ImageLoadError, match=r"upload: 40000x40000 = 1600000000 pixels, over the limit"):
        decode_image(bomb.read_bytes(), name="upload")


def test_decode_image_reads_bytes_like_a_file(tmp_path):
    from PIL import Image as PILImage

    PILImage.new("LA", (5, 3), (40, 0)).save(tmp_path / "clear.png")
    data = (tmp_path / "clear.png").read_bytes()
    assert decode_image(data, "L").getpixel((0, 0)) == load_image(tmp_path / "clear.png", "L").getpixel((0, 0)) == 255
    with pytest.raises(ImageLoadError, match=r"^post: not an image file"):
        decode_image(b"hello, not a picture", name="post")
    with pytest.raises(ImageLoadError, match=r"^post: empty file"):
        decode_image(b"", name="post")
    for cut in (4, 20, len(data) // 2, 50):  # inside the signature, the header chunk, the pixel data
        with pytest.raises(ImageLoadError, match=r"^post: corrupt or truncated image"):
            decode_image(data[:cut], name="post")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # ends inside the header chunks
    with pytest.raises(ImageLoadError, match=r"cut\.png: corrupt or truncated image \(starts like a PNG file\)"):
        load_image(tmp_path / "cut.png")


def test_image_format_names_damaged_headers_only():
    assert image_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert image_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WebP"
    assert image_format(b"BM\x00\x01\x00\x00\x00\x00\x00\x00\x36\x00") == "BMP"
    assert image_format(b"P5\n28 28\n255\n") == "PPM"
    for text in (b"hello", b"BMW cars are fast", b"RIFF....WAVEfmt ", b"Pandas", b"", b"\x89P"):
        assert image_format(text) is None, text


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    path = tmp_path / "wide.png"
    PILImage.new("RGB", (300, 200)).save(path)
    monkeypatch.setenv("DSNET_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(ImageLoadError, match=r"300x200 = 60000 pixels, over the limit of 50000"):
        load_image(path)
    monkeypatch.setenv("DSNET_MAX_IMAGE_PIXELS", "60000")
    assert load_image(path).size == (300, 200)
    monkeypatch.setenv("DSNET_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="DSNET_MAX_IMAGE_PIXELS='lots': expected a positive number"):
        load_image(path)

"""Tests for quadtree_vae.media: reading/writing images, videos and latent files, atomically."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from quadtree_vae import media
from quadtree_vae.errors import InvalidInputError


def _clip(t: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth moving content (codecs keep it well): a bright bar sliding over a gradient."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (xx * 255 // max(1, w - 1)).astype(np.uint8)
        frames[i, ..., 1] = (yy * 255 // max(1, h - 1)).astype(np.uint8)
        frames[i, ..., 2] = 60
        frames[i, :, 4 * i : 4 * i + 8] = 230
    return frames


def _write_mp4_with_pyav(path: Path, frames: np.ndarray, fps: int) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------------------------ pixels


def test_tensor_conversion_roundtrip():
    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)
    x = media.to_tensor(frames)
    assert x.shape == (2, 3, 8, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(media.from_tensor(x), frames)
    assert np.array_equal(media.from_tensor(torch.full((1, 3, 2, 2), 5.0)), np.full((1, 2, 2, 3), 255, np.uint8))


# ------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_lossless_image_roundtrip(tmp_path, ext):
    frame = _clip(1)[0]
    path = tmp_path / f"a{ext}"
    media.write_media(path, frame[None], None)
    m = media.read_media(path)
    assert not m.is_video and m.fps is None and m.count == 1
    assert np.array_equal(m.frames[0], frame)
    assert _leftovers(tmp_path) == []


def test_jpeg_and_odd_inputs(tmp_path):
    frame = _clip(1)[0]
    media.write_media(tmp_path / "a.jpg", frame[None], None)
    back = media.read_image(tmp_path / "a.jpg")
    assert back.shape == frame.shape and np.abs(back.astype(int) - frame).mean() < 4
    Image.fromarray(frame[..., 0], "L").save(tmp_path / "grey.png")  # greyscale and alpha become RGB
    assert media.read_image(tmp_path / "grey.png").shape == (32, 48, 3)
    Image.fromarray(np.dstack([frame, np.full(frame.shape[:2], 128, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(media.read_image(tmp_path / "rgba.png"), frame)


def test_image_write_refuses_several_frames(tmp_path):
    with pytest.raises(InvalidInputError, match="frames cannot go into an image"):
        media.write_media(tmp_path / "a.png", _clip(3), None)
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        media.read_media(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(InvalidInputError, match="cannot read the image"):
        media.read_media(tmp_path / "bad.png")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidInputError, match="cannot read the video"):
        media.read_media(tmp_path / "bad.mp4")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InvalidInputError, match="unknown file type"):
        media.read_media(tmp_path / "notes.txt")


# ------------------------------------------------------------------------------------------ videos


def test_reads_a_pyav_video_with_its_rate(tmp_path):
    frames = _clip(6)
    _write_mp4_with_pyav(tmp_path / "v.mp4", frames, 12)
    m = media.read_media(tmp_path / "v.mp4")
    assert m.is_video and m.count == 6 and m.size == (32, 48) and m.fps == 12
    assert np.abs(m.frames.astype(int) - frames).mean() < 6


@pytest.mark.parametrize(("ext", "fps", "tol"), [(".mp4", Fraction(30000, 1001), 6), (".webm", Fraction(10), 8),
                                                 (".gif", Fraction(10), 12)])
def test_video_roundtrip_keeps_count_and_rate(tmp_path, ext, fps, tol):
    frames = _clip(5)
    frames[3] = frames[2]  # identical neighbours must stay two frames
    path = tmp_path / f"v{ext}"
    media.write_media(path, frames, fps)
    m = media.read_media(path)
    assert m.count == 5 and m.fps == fps and m.size == (32, 48)
    assert np.abs(m.frames.astype(int) - frames).mean() < tol
    assert _leftovers(tmp_path) == []


def test_gif_rate_is_rounded_to_centiseconds(tmp_path):
    media.write_media(tmp_path / "v.gif", _clip(3), Fraction(16))  # 62.5 ms per frame: GIF stores 6 cs
    assert media.read_media(tmp_path / "v.gif").fps == Fraction(50, 3)


def test_single_frame_video_and_odd_size(tmp_path):
    media.write_media(tmp_path / "one.mp4", _clip(1), None)
    m = media.read_media(tmp_path / "one.mp4")
    assert m.count == 1 and m.fps == media.DEFAULT_FPS
    with pytest.raises(InvalidInputError, match="even height and width"):
        media.write_media(tmp_path / "odd.mp4", _clip(2, 31, 48), Fraction(8))
    assert _leftovers(tmp_path) == [] and not (tmp_path / "odd.mp4").exists()


# --------------------------------------------------------------------------------------- atomicity


def test_check_output(tmp_path):
    exts = (".png",)
    assert media.check_output(tmp_path / "a.png", False, exts) == tmp_path / "a.png"
    with pytest.raises(InvalidInputError, match="cannot write '.bmp'"):
        media.check_output(tmp_path / "a.bmp", False, exts)
    with pytest.raises(InvalidInputError, match="does not exist"):
        media.check_output(tmp_path / "no" / "a.png", False, exts)
    (tmp_path / "a.png").write_bytes(b"old")
    with pytest.raises(InvalidInputError, match="already exists; pass --force"):
        media.check_output(tmp_path / "a.png", False, exts)
    assert media.check_output(tmp_path / "a.png", True, exts)
    (tmp_path / "d.png").mkdir()
    with pytest.raises(InvalidInputError, match="is a directory"):
        media.check_output(tmp_path / "d.png", True, exts)


def test_atomic_path_success_failure_and_force(tmp_path):
    dest = tmp_path / "out.bin"
    with media.atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".bin" and tmp != dest
        tmp.write_bytes(b"new")
        assert not dest.exists()  # nothing visible until complete
    assert dest.read_bytes() == b"new"
    assert dest.stat().st_mode & 0o777 == media._umask_mode()  # not mkstemp's 0600

    with pytest.raises(RuntimeError, match="disk on fire"), media.atomic_path(dest, force=True) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")
    assert dest.read_bytes() == b"new" and _leftovers(tmp_path) == []

    with pytest.raises(InvalidInputError, match="already exists"), media.atomic_path(dest) as tmp:
        tmp.write_bytes(b"other")  # the file appeared meanwhile: kept without force
    assert dest.read_bytes() == b"new" and _leftovers(tmp_path) == []

    with media.atomic_path(dest, force=True) as tmp:
        tmp.write_bytes(b"forced")
    assert dest.read_bytes() == b"forced"


def test_failed_video_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = av.VideoFrame.from_ndarray

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder crashed")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", flaky)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        media.write_media(tmp_path / "v.mp4", _clip(5), Fraction(8))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ latents


def test_latent_roundtrip_with_metadata(tmp_path):
    z = torch.randn(1, 16, 2, 4, 6)
    meta = {"architecture": "wan2.1", "frames": 6, "fps": "30000/1001", "random_weights": True,
            "shape": list(z.shape), "skip": None}
    media.save_latent(tmp_path / "z.safetensors", z, meta)
    back, m, notes = media.load_latent(tmp_path / "z.safetensors")
    assert torch.equal(back, z) and notes == []
    assert m["format"] == media.LATENT_FORMAT and "skip" not in m
    assert media.meta_value(m, "frames") == 6
    assert media.meta_value(m, "random_weights") is True
    assert media.meta_value(m, "shape") == [1, 16, 2, 4, 6]
    assert media.meta_value(m, "architecture") == "wan2.1"
    assert media.fps_from_meta(media.meta_value(m, "fps")) == Fraction(30000, 1001)
    assert media.fps_from_meta(None) is None and media.fps_from_meta("nonsense") is None
    assert _leftovers(tmp_path) == []


def test_foreign_latent_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "one.safetensors"))
    z, meta, notes = media.load_latent(tmp_path / "one.safetensors")
    assert z.shape == (1, 4, 2, 2) and meta == {} and "using the only tensor, 'latents'" in notes[0]
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(InvalidInputError, match="no 'latent' tensor"):
        media.load_latent(tmp_path / "two.safetensors")
    save_file({"latent": torch.zeros(1, 4, 2, 2, dtype=torch.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(InvalidInputError, match="floating point"):
        media.load_latent(tmp_path / "int.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(InvalidInputError, match="cannot read the latent file"):
        media.load_latent(tmp_path / "junk.safetensors")


def test_16bit_greyscale_keeps_its_range_and_precision(tmp_path):
    """A 16-bit PNG (mode I;16) is scaled from 65535, not clipped at 255 (issue 10)."""
    grad = (np.arange(64 * 64).reshape(64, 64) * 16 + 3).astype(np.uint16)  # 3 .. 65523, odd low bits
    path = tmp_path / "g16.png"
    Image.fromarray(grad).save(path)
    assert Image.open(path).mode == "I;16"
    deep = media.read_image(path, deep=True)
    assert deep.dtype == np.uint16 and deep.shape == (64, 64, 3)
    assert np.array_equal(deep[..., 1], grad)
    x = media.to_tensor(deep[None])
    assert torch.allclose(x[0, 0].double(), torch.from_numpy(grad / 32767.5 - 1.0), atol=1e-6)  # all 16 bits
    assert (x > 0.99).float().mean() < 0.01  # not a white image
    flat = media.read_image(path)
    assert flat.dtype == np.uint8 and np.array_equal(flat[..., 0], np.round(grad / 257).astype(np.uint8))
    assert np.array_equal(media.to_8bit(deep), flat)
    assert media.read_media(path, deep=True).frames.dtype == np.uint16
    ends = media.to_tensor(np.array([0, 65535], np.uint16).reshape(1, 1, 2, 1).repeat(3, 3))
    assert ends[0, 0, 0].tolist() == [-1.0, 1.0]


def test_32bit_images_are_refused(tmp_path):
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(InvalidInputError, match="no defined white level"):
        media.read_image(tmp_path / "f.tif")

"""Tests for the qvae command line (in-process through ``main``, plus two real subprocesses),
and for the helpers it is built on: measure, plot, PSNR/SSIM.

Tiny random models keep this fast: ``random:wan2.1:tiny`` (16 latent channels, 8x/4x factors) and
``random:sd:tiny`` (4 latent channels), on 64x64 images and 5-frame 32x32 clips.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image
from safetensors import safe_open

import quadtree_vae as qv
from quadtree_vae import cli, demo, media, metrics
from quadtree_vae.cli import main
from quadtree_vae.console import RANDOM_NOTE
from quadtree_vae.loading import random_vae

WAN = ["--vae", "random:wan2.1:tiny"]
SD = ["--vae", "random:sd:tiny"]
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ inputs


def _image(h: int = 64, w: int = 64) -> np.ndarray:
    return demo.sample_image((h, w))


def _png(folder: Path, name: str = "in.png", h: int = 64, w: int = 64) -> Path:
    path = folder / name
    Image.fromarray(_image(h, w)).save(path)
    return path


def _video(folder: Path, name: str, t: int = 5, fps: int = 10, size: int = 32) -> Path:
    """A clip written with PyAV (mp4) or Pillow (gif), independent of quadtree_vae.media."""
    frames = demo.moving_shapes(t, size)
    path = folder / name
    if name.endswith(".gif"):
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
        return path
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _latent(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latent")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------------------- subprocess


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "quadtree_vae", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for command in ("encode", "decode", "roundtrip", "inspect", "demo"):
        assert command in r.stdout


def test_console_script_error_exit_code(tmp_path):
    exe = shutil.which("qvae") or str(Path(sys.executable).parent / "qvae")
    if not Path(exe).exists():
        pytest.skip("the qvae console script is not installed")
    r = subprocess.run([exe, "decode", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "no such file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_usage_errors_return_2(capsys):
    assert main(["encode"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "usage" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- images


def test_image_encode_decode_matches_untiled_decode(tmp_path, capsys):
    src = _png(tmp_path)
    lat, png = tmp_path / "z.safetensors", tmp_path / "out.png"
    code, _, err = _run(capsys, "encode", src, "-o", lat, *WAN, "--tile", "32")
    assert code == 0, err
    assert RANDOM_NOTE in err

    meta = _meta(lat)
    z = _latent(lat)
    assert z.shape == (1, 16, 1, 8, 8)
    vae = random_vae("wan2.1", tiny=True)
    assert meta["format"] == "quadtree-vae-latent"
    assert meta["architecture"] == "wan2.1" and meta["vae_class"] == "AutoencoderKLWan"
    assert meta["shape"] == "[1, 16, 1, 8, 8]" and meta["kind"] == "image"
    assert meta["frames"] == "1" and meta["random_weights"] == "true" and meta["note"] == RANDOM_NOTE
    assert meta["fingerprint"] == qv.loading.fingerprint(vae)
    assert "fps" not in meta

    # the CLI's latents equal the untiled encoder's
    x = media.to_tensor(np.asarray(Image.open(src).convert("RGB"))[None]).unsqueeze(2)
    with torch.no_grad():
        assert torch.allclose(z, vae.encode(x).latent_dist.mode(), atol=1e-5)

    code, _, err = _run(capsys, "decode", lat, "-o", png, *WAN, "--tile", "32")
    assert code == 0, err
    assert RANDOM_NOTE in err
    assert qv.plan(vae, z.shape, tile=32).tiles > len(qv.plan(vae, z.shape, tile=32).segments)  # really tiled
    # the tiled decode written by the CLI equals an untiled decode of the same latents, through the files
    with torch.no_grad():
        ref = media.from_tensor(vae.decode(_latent(lat)).sample[:, :, 0])[0]
    got = np.asarray(Image.open(png).convert("RGB"))
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert got.shape == (64, 64, 3) and diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert _no_temp_files(tmp_path)


def test_roundtrip_prints_psnr_ssim(tmp_path, capsys):
    src = _png(tmp_path)
    code, out, err = _run(capsys, "roundtrip", src, "-o", tmp_path / "rt.webp", *SD, "--tile", "32")
    assert code == 0, err
    m = re.search(r"PSNR (\S+) dB\s+SSIM (\S+)", out)
    assert m, out
    # the same round trip through the untiled model, measured independently
    vae = random_vae("sd", tiny=True)
    frames = media.read_image(src)[None]
    with torch.no_grad():
        y = vae.decode(vae.encode(media.to_tensor(frames)).latent_dist.mode()).sample
    back = media.from_tensor(y)
    assert float(m.group(1)) == pytest.approx(metrics.psnr(frames, back), abs=0.02)
    assert float(m.group(2)) == pytest.approx(metrics.ssim(frames, back), abs=2e-4)
    assert Image.open(tmp_path / "rt.webp").size == (64, 64)
    assert RANDOM_NOTE in err


def test_psnr_ssim_values():
    a = _image(32, 32)[None]
    assert metrics.psnr(a, a) == float("inf") and metrics.ssim(a, a) == pytest.approx(1.0)
    noise = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
    assert metrics.ssim(a, noise) < 0.2 and metrics.psnr(a, noise) < 15
    b = np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8)
    assert metrics.psnr(a, b) > 40 and metrics.ssim(a, b) > 0.99


def test_sizes_not_multiple_of_8(tmp_path, capsys):
    src = _png(tmp_path, "odd.png", 60, 70)
    code, _, err = _run(capsys, "encode", src, "-o", tmp_path / "z.safetensors", *WAN)
    assert code == 2 and "multiples of 8" in err and "--fit crop" in err and "--fit pad" in err
    assert "wrote" not in err  # refused before the model runs (the factor is the loaded model's)
    assert not (tmp_path / "z.safetensors").exists()

    code, _, err = _run(capsys, "encode", src, "-o", tmp_path / "c.safetensors", *SD, "--fit", "crop")
    assert code == 0, err
    assert _latent(tmp_path / "c.safetensors").shape == (1, 4, 7, 8)  # 56x64
    assert _meta(tmp_path / "c.safetensors")["crop_offset"] == "[2, 3]"

    code, _, err = _run(capsys, "encode", src, "-o", tmp_path / "p.safetensors", *SD, "--fit", "pad")
    assert code == 0, err
    assert _latent(tmp_path / "p.safetensors").shape == (1, 4, 8, 9)  # 64x72
    code, _, err = _run(capsys, "decode", tmp_path / "p.safetensors", "-o", tmp_path / "p.png", *SD)
    assert code == 0, err
    assert Image.open(tmp_path / "p.png").size == (70, 60)  # the padding is cropped off again
    assert "cropped the --fit pad border off" in err


# ------------------------------------------------------------------------------------------- videos


def test_video_encode_decode_keeps_frames_and_fps(tmp_path, capsys):
    src = _video(tmp_path, "clip.mp4", t=5, fps=10)
    lat = tmp_path / "clip.safetensors"
    code, _, err = _run(capsys, "encode", src, "-o", lat, *WAN, "--tile", "24")
    assert code == 0, err
    meta = _meta(lat)
    assert _latent(lat).shape == (1, 16, 2, 4, 4)
    assert meta["kind"] == "video" and meta["frames"] == "5" and meta["fps"] == "10" and meta["frames_encoded"] == "5"

    for ext in (".mp4", ".gif"):
        out = tmp_path / f"dec{ext}"
        code, _, err = _run(capsys, "decode", lat, "-o", out, *WAN)
        assert code == 0, err
        m = media.read_media(out)
        assert m.count == 5 and m.fps == 10 and m.size == (32, 32)

    # video latents do not fit in an image file: refused before decoding
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "x.png", *WAN)
    assert code == 2 and "5 frames" in err and not (tmp_path / "x.png").exists()


def test_gif_input_and_fps_override(tmp_path, capsys):
    src = _video(tmp_path, "clip.gif", t=5, fps=20)
    lat = tmp_path / "g.safetensors"
    assert _run(capsys, "encode", src, "-o", lat, *WAN)[0] == 0
    assert _meta(lat)["fps"] == "20"
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "g.mp4", *WAN, "--fps", "25")
    assert code == 0, err
    m = media.read_media(tmp_path / "g.mp4")
    assert m.count == 5 and m.fps == 25


@pytest.mark.parametrize(("policy", "latent_t", "decoded"), [("error", None, None), ("trim", 2, 5), ("pad", 3, 6)])
def test_frame_policies(tmp_path, capsys, policy, latent_t, decoded):
    src = _video(tmp_path, "six.mp4", t=6, fps=8)
    lat = tmp_path / "six.safetensors"
    argv = ["encode", src, "-o", lat, *WAN] + ([] if policy == "error" else ["--frames", policy])
    code, _, err = _run(capsys, *argv)
    if policy == "error":
        assert code == 2 and "6 frames" in err and "--frames trim" in err and "--frames pad" in err
        assert "Traceback" not in err and not lat.exists()
        return
    assert code == 0, err
    assert _latent(lat).shape[2] == latent_t
    meta = _meta(lat)
    assert meta["frames"] == "6"
    assert meta.get("frames_trimmed" if policy == "trim" else "frames_padded") == ("1" if policy == "trim" else "3")
    assert f"--frames {policy}" in err
    assert ("from 5 frames (the first 5 of 6)" if policy == "trim" else "from 6 frames (padded to 9)") in err
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "six_out.mp4", *WAN)
    assert code == 0, err
    m = media.read_media(tmp_path / "six_out.mp4")
    assert m.count == decoded and m.fps == 8
    if policy == "pad":
        assert "dropped the 3 padding frame(s)" in err


def test_video_through_2d_vae_is_encoded_frame_by_frame(tmp_path, capsys):
    src = _video(tmp_path, "six.mp4", t=6, fps=8)
    lat = tmp_path / "sd.safetensors"
    code, _, err = _run(capsys, "encode", src, "-o", lat, *SD)
    assert code == 0, err
    assert "one by one" in err
    assert _latent(lat).shape == (6, 4, 4, 4) and _meta(lat)["frames_as_batch"] == "true"
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "sd.mp4", *SD)
    assert code == 0, err
    m = media.read_media(tmp_path / "sd.mp4")
    assert m.count == 6 and m.fps == 8


# --------------------------------------------------------------------------------- files and errors


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = _png(tmp_path)
    lat = tmp_path / "z.safetensors"
    lat.write_bytes(b"precious")
    code, _, err = _run(capsys, "encode", src, "-o", lat, *WAN)
    assert code == 2 and "already exists" in err and "--force" in err
    assert "vae:" not in err  # checked before loading anything
    assert lat.read_bytes() == b"precious"
    code, _, err = _run(capsys, "encode", src, "-o", lat, *WAN, "--force")
    assert code == 0, err
    assert _latent(lat).shape == (1, 16, 1, 8, 8)


def test_failure_midway_leaves_no_file(tmp_path, capsys, monkeypatch):
    src = _png(tmp_path)
    lat = tmp_path / "z.safetensors"

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash in the encoder")

    monkeypatch.setattr(qv.api, "run_tiled", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):  # a real bug: its traceback is shown
        main(["encode", str(src), "-o", str(lat), *WAN])
    assert not lat.exists() and _no_temp_files(tmp_path)
    monkeypatch.undo()

    # a writer that dies half-way through the file: no partial output, no temp file, old file kept
    from PIL import Image as PILImage

    out = tmp_path / "out.png"
    out.write_bytes(b"old")

    def half_write(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", half_write)
    code, _, err = _run(capsys, "roundtrip", src, "-o", out, *SD, "--force")
    assert code == 1 and "error: No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == b"old" and _no_temp_files(tmp_path)


def test_wrong_latent_channels(tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    assert _run(capsys, "encode", _png(tmp_path), "-o", lat, *WAN)[0] == 0
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "x.png", *SD)
    assert code == 2
    assert "16 channels" in err and "takes 4" in err and "--vae" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_other_weights_warn_about_fingerprint(tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    assert _run(capsys, "encode", _png(tmp_path), "-o", lat, *WAN)[0] == 0
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "x.png", "--vae", "random:wan2.1:tiny:seed=1")
    assert code == 0, err
    assert "warning:" in err and "fingerprint" in err


def test_unknown_vae_path(tmp_path, capsys):
    code, _, err = _run(capsys, "encode", _png(tmp_path), "-o", tmp_path / "z.safetensors",
                        "--vae", tmp_path / "nope" / "vae.safetensors")
    assert code == 2 and err.startswith("error: ") and "no such file" in err and "Traceback" not in err
    code, _, err = _run(capsys, "inspect", "--size", "64", "--vae", "random:nonsense")
    assert code == 2 and "unknown arch" in err
    with pytest.raises(qv.LoadError):  # --debug shows the traceback
        main(["encode", str(_png(tmp_path)), "-o", str(tmp_path / "z.safetensors"), "--debug",
              "--vae", str(tmp_path / "nope.safetensors")])


def test_bad_option_values(tmp_path, capsys):
    src = _png(tmp_path)
    code, _, err = _run(capsys, "encode", src, "-o", tmp_path / "z.safetensors", *WAN, "--budget", "lots")
    assert code == 2 and "cannot read memory size" in err
    code, _, err = _run(capsys, "encode", src, "-o", tmp_path / "z.safetensors", *WAN, "--tile", "8")
    assert code == 2 and "minimum tile side" in err
    code, _, err = _run(capsys, "encode", src, "-o", tmp_path / "z.png", *WAN)
    assert code == 2 and ".safetensors" in err
    assert list(p.name for p in tmp_path.iterdir()) == ["in.png"]


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_and_quiet(tmp_path, monkeypatch, quiet):
    src = _png(tmp_path)
    err = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["encode", str(src), "-o", str(tmp_path / "z.safetensors"), *WAN, "--tile", "32"]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    text = err.getvalue()
    if quiet:
        assert "tile" not in text and "%|" not in text and "vae:" not in text
        assert text.strip() == f"warning: {RANDOM_NOTE}"  # random weights are always reported
    else:
        assert "encode:" in text and "tile" in text and "vae:" in text


# ------------------------------------------------------------------------ pixel tensors, Wan 2.2 fixture


def test_wan22_fixture_through_qvae_with_pixel_tensors(tmp_path, capsys):
    """The original Wan 2.2 implementation's outputs, reproduced by `qvae encode` / `qvae decode` on the
    release-layout weights file: the input and the decoded output as float tensors (no 8-bit step)."""
    from safetensors.torch import load_file, save_file

    folder = FIXTURES / "wan22-original-tiny"
    cases = load_file(folder / "cases.safetensors")
    vae = ["--vae", str(folder / "model.safetensors"), "--tile", "80"]  # 2x2 tiles on 128x160
    pixels, z = tmp_path / "clip.safetensors", tmp_path / "z.safetensors"
    save_file({"pixels": cases["video_1x128x160"]}, str(pixels))
    code, _, err = _run(capsys, "encode", pixels, "-o", z, *vae)
    assert code == 0, err
    assert _latent(z).shape == (1, 8, 1, 8, 10)
    assert (_latent(z) - cases["mu_1x128x160"]).abs().max() <= 1e-4
    assert _meta(z)["pixels"] == "tensor" and _meta(z)["architecture"] == "wan2.2"

    given, out = tmp_path / "given.safetensors", tmp_path / "out.safetensors"
    save_file({"latent": cases["z_1x128x160"]}, str(given))
    code, _, err = _run(capsys, "decode", given, "-o", out, *vae)
    assert code == 0, err
    with safe_open(str(out), framework="pt") as f:
        y, meta = f.get_tensor("pixels"), f.metadata()
    assert meta["format"] == media.PIXELS_FORMAT and y.dtype == torch.float32
    assert (y - cases["decoded_1x128x160"].clamp(-1, 1)).abs().max() <= 1e-4  # the release decode, then clamped


def test_qwen_image21_rgba_pixel_tensor_through_qvae(tmp_path, capsys):
    """Qwen-Image 2.1 takes 4-channel (RGBA) frames, which image files do not give: a pixel tensor does."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 4, 1, 64, 96, generator=g) * 2 - 1
    pixels, z, out = tmp_path / "rgba.safetensors", tmp_path / "z.safetensors", tmp_path / "out.safetensors"
    save_file({"pixels": x}, str(pixels))
    spec = ["--vae", "random:qwen-image-2.1:tiny", "--tile", "48"]
    assert _run(capsys, "encode", pixels, "-o", z, *spec)[0] == 0
    assert _run(capsys, "decode", z, "-o", out, *spec)[0] == 0
    vae = random_vae("qwen-image-2.1", tiny=True)
    with torch.no_grad():
        want_z = vae.encode(x).latent_dist.mode()
        want_y = vae.decode(_latent(z)).sample
    with safe_open(str(out), framework="pt") as f:
        y = f.get_tensor("pixels")
    assert (_latent(z) - want_z).abs().max() <= 1e-4 and (y - want_y).abs().max() <= 1e-4


def test_pixel_tensor_of_a_shape_the_model_does_not_take(tmp_path, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"pixels": torch.zeros(1, 3, 6, 64, 64)}, str(bad))  # 6 frames: not 1 + 4k
    code, _, err = _run(capsys, "encode", bad, "-o", tmp_path / "z.safetensors", "--vae", "random:wan2.2:tiny")
    assert code == 2 and "error:" in err and "6 frames" in err and "Traceback" not in err
    save_file({"pixels": torch.zeros(1, 3, 1, 64, 72)}, str(bad))
    code, _, err = _run(capsys, "encode", bad, "-o", tmp_path / "z.safetensors", "--vae", "random:wan2.2:tiny",
                        "--force")
    assert code == 2 and "not multiples of 16" in err
    save_file({"pixels": torch.zeros(1, 3, 64, 64, dtype=torch.int32)}, str(bad))
    code, _, err = _run(capsys, "encode", bad, "-o", tmp_path / "z.safetensors", *SD, "--force")
    assert code == 2 and "finite floats" in err


# ----------------------------------------------------------------------------------- inspect / plot


def test_inspect_plan_and_plot(tmp_path, capsys):
    plot = tmp_path / "layout.png"
    code, out, err = _run(capsys, "inspect", "--size", "64x64", *WAN, "--tile", "32", "--plot", plot)
    assert code == 0, err
    assert "AutoencoderKLWan" in out and "arch wan2.1" in out and "0.9M parameters" in out
    assert "encode:" in out and "decode:" in out and "halo" in out and "estimated peak" in out
    assert RANDOM_NOTE in out
    im = Image.open(plot)
    assert im.format == "PNG" and im.width >= 64
    code, _, err = _run(capsys, "inspect", "--size", "64x64", *WAN, "--plot", plot)
    assert code == 2 and "already exists" in err

    # over an input image, and for a video with a frame count that needs padding
    code, out, err = _run(capsys, "inspect", _png(tmp_path, h=48, w=64), *SD, "--tile", "16", "--op", "encode",
                          "--plot", tmp_path / "over.png")
    assert code == 0, err
    assert "over the input" in out and "decode with" not in out
    code, out, _ = _run(capsys, "inspect", "--size", "32", "--frames", "6", *WAN)
    assert "planning for 9" in out and "(1, 3, 9, 32, 32)" in out


@pytest.mark.parametrize("spec,args,latent,tile", [
    ("random:wan2.2:tiny", ("--frames", "5"), (1, 48, 2, 4, 6), 48),  # 16x spatial, 2x2 patchify
    ("random:flux2:tiny", (), (1, 32, 8, 12), 32),
])
def test_inspect_plot_on_the_new_families(tmp_path, capsys, spec, args, latent, tile):
    from quadtree_vae.plot import image_segment

    plot = tmp_path / "layout.png"
    code, out, err = _run(capsys, "inspect", "--size", "64x96", *args, "--vae", spec, "--tile", str(tile),
                          "--plot", plot)
    assert code == 0, err
    assert f"-> latent {latent}" in out and "encode:" in out and "decode:" in out
    p = qv.plan(random_vae(spec.split(":")[1], tiny=True), latent, tile=tile, op="decode")
    idx, seg = image_segment(p)
    assert seg.size_out == (64, 96)  # the plotted segment is the one at image resolution
    assert f"wrote {plot}: decode segment {idx}, {len(seg.layout)} tiles" in out
    im = Image.open(plot)
    assert im.format == "PNG" and im.width >= 96 and im.height >= im.width * 64 // 96  # the frame, plus a caption


def test_inspect_needs_a_size(capsys):
    code, _, err = _run(capsys, "inspect", *WAN)
    assert code == 2 and "--size" in err


def test_plot_draws_image_resolution_tiles():
    from quadtree_vae.plot import draw_layout, image_segment

    vae = random_vae("sd", tiny=True)
    p = qv.plan(vae, (1, 4, 8, 8), tile=40)  # 32-px cores: a block sees 32 + halo <= 40 px
    i, seg = image_segment(p)
    assert seg.size_out == (64, 64) and len(seg.layout) == 4 and not seg.is_global
    blank = draw_layout(p)
    over = draw_layout(p, _image(64, 64))
    assert blank.size == over.size and blank.width == 384  # small images are drawn enlarged
    assert np.asarray(blank).std() < np.asarray(over).std()


# --------------------------------------------------------------------------------------- demo, measure


def test_demo_runs_and_defaults_to_full_model(tmp_path, capsys):
    assert cli.build_parser().parse_args(["demo"]).vae == "random:wan2.1"
    assert cli.build_parser().parse_args(["demo"]).size == 256
    threads = torch.get_num_threads()
    code, out, err = _run(capsys, "demo", *WAN, "--size", "96", "--out", tmp_path, "--threads", "1")
    assert code == 0, err
    assert torch.get_num_threads() == threads  # restored
    assert RANDOM_NOTE in out
    rows = [line for line in out.splitlines() if line.startswith(("image", "clip"))]
    assert len(rows) == 4
    for row in rows:
        cells = row.split()
        assert int(cells[4]) > 1  # several tiles
        assert float(cells[5]) < 1e-4  # tiled == untiled up to float rounding
        assert "MiB" in row or "KiB" in row
    assert (tmp_path / demo.LAYOUT_FILE).exists()
    code, _, err = _run(capsys, "demo", *WAN, "--size", "96", "--out", tmp_path)
    assert code == 2 and "already exists" in err


def test_measure_reports_the_peak_of_the_call_only():
    from quadtree_vae.measure import fmt_seconds, measure

    def allocate(n):
        t = torch.ones(n // 4)  # n bytes of float32
        return float(t.sum())

    measure(allocate, 256 * 2**20)  # an earlier, larger peak must not show in the next measurement
    result, seconds, peak = measure(allocate, 64 * 2**20)
    assert result == 16 * 2**20 and seconds > 0
    assert 60 * 2**20 <= peak <= 100 * 2**20

    def fails():
        raise ValueError("bad things")

    with pytest.raises(ValueError, match="bad things"):
        measure(fails)
    assert fmt_seconds(0.5) == "500 ms" and fmt_seconds(3) == "3.00 s"


def test_sample_asset_is_bundled():
    path = Path(qv.__file__).parent / "assets" / "sample.png"
    assert path.exists() and path.stat().st_size < 300_000
    im = demo.sample_image()
    assert im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) >= 256
    clip = demo.moving_shapes(5, 32)
    assert clip.shape == (5, 32, 32, 3) and not np.array_equal(clip[0], clip[-1])


# --------------------------------------------------------------------------- real checkpoint layouts



def test_video_through_an_original_wan_release_file(tmp_path, capsys):
    """A file in the original Wan 2.1 layout: the CLI's latents and decoded frames equal the untiled model's."""
    from quadtree_vae.loading import load_vae

    ckpt = FIXTURES / "wan21-original-tiny" / "model.safetensors"
    src = _video(tmp_path, "in.mp4", t=9, size=64)
    lat, out = tmp_path / "z.safetensors", tmp_path / "out.mp4"
    code, _, err = _run(capsys, "encode", src, "-o", lat, "--vae", ckpt, "--tile", "32", "-q")
    assert code == 0, err
    assert "random weights" not in err and _meta(lat)["random_weights"] == "false"
    vae = load_vae(ckpt)
    frames, _ = media.read_video(src)
    x = media.to_tensor(frames).permute(1, 0, 2, 3).unsqueeze(0)
    z = _latent(lat)
    with torch.no_grad():
        assert (z - vae.encode(x).latent_dist.mode()).abs().max() <= 1e-4
    code, _, err = _run(capsys, "decode", lat, "-o", out, "--vae", ckpt, "--tile", "32", "-q")
    assert code == 0, err
    decoded, _ = media.read_video(out)
    assert decoded.shape == (9, 64, 64, 3)


def test_image_through_an_ldm_layout_file_with_a_prefix(tmp_path, capsys):
    """An SD-family file in the ldm layout under a ``first_stage_model.`` prefix, as in full checkpoints."""
    from safetensors.torch import load_file, save_file

    from quadtree_vae.loading import load_vae

    sd = load_file(FIXTURES / "sd-ldm-tiny" / "model.safetensors")
    ckpt = tmp_path / "full_checkpoint.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in sd.items()}, ckpt)
    src, lat, png = _png(tmp_path, h=64, w=96), tmp_path / "z.safetensors", tmp_path / "out.png"
    assert _run(capsys, "encode", src, "-o", lat, "--vae", ckpt, "--tile", "32", "-q")[0] == 0
    assert _run(capsys, "decode", lat, "-o", png, "--vae", ckpt, "--tile", "32", "-q")[0] == 0
    vae = load_vae(ckpt)
    x = media.to_tensor(np.asarray(Image.open(src).convert("RGB"))[None])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        ref = media.from_tensor(vae.decode(_latent(lat)).sample)[0]
    assert (_latent(lat) - z).abs().max() <= 1e-4
    got = np.asarray(Image.open(png).convert("RGB"))
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


# ------------------------------------------------------------------------------- streaming videos


def _watch_decode_frames(monkeypatch, events: list, fail_after: int | None = None, error: BaseException | None = None):
    """Log each chunk ``qv.decode_frames`` yields (and raise ``error`` once ``fail_after`` were taken)."""
    real = qv.stream.decode_frames

    def watched(*args, **kwargs):
        for k, y in enumerate(real(*args, **kwargs)):
            if fail_after is not None and k == fail_after:
                raise error
            events.append(("decoded", y.shape[2]))
            yield y

    monkeypatch.setattr(qv.stream, "decode_frames", watched)


def test_decode_writes_each_window_as_it_finishes(tmp_path, capsys, monkeypatch):
    lat = tmp_path / "z.safetensors"
    media.save_latent(lat, torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0)), {"fps": "8"})
    events: list = []
    _watch_decode_frames(monkeypatch, events)
    real_write, written = media._VideoEncoder.write, []

    def write(self, frames):
        events.append(("written", frames.shape[0]))
        written.append(frames.copy())
        real_write(self, frames)

    monkeypatch.setattr(media._VideoEncoder, "write", write)
    code, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "out.mp4", *WAN, "--tile", "24")
    assert code == 0, err
    # window by window (1 latent frame: 1 then 4 frames), each written before the next is decoded
    assert events == [("decoded", 1), ("written", 1), ("decoded", 4), ("written", 4), ("decoded", 4), ("written", 4)]
    assert media.read_video(tmp_path / "out.mp4")[0].shape == (9, 32, 32, 3)
    # the frames handed to the encoder are the untiled model's
    vae = random_vae("wan2.1", tiny=True)
    with torch.no_grad():
        ref = cli.latents.frames_of(vae.decode(_latent(lat)).sample, True)
    assert np.abs(np.concatenate(written).astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize(("error", "status"), [(KeyboardInterrupt(), 130),
                                               (qv.errors.NonFiniteOutputError("overflow"), 2)])
@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_interrupted_decode_leaves_nothing(tmp_path, capsys, monkeypatch, error, status, ext):
    lat = tmp_path / "z.safetensors"
    media.save_latent(lat, torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0)), {"fps": "8"})
    events: list = []
    _watch_decode_frames(monkeypatch, events, fail_after=2, error=error)
    out = tmp_path / f"out{ext}"
    code, _, err = _run(capsys, "decode", lat, "-o", out, *WAN)
    assert code == status and "Traceback" not in err
    assert events == [("decoded", 1), ("decoded", 4)]  # it stopped half-way, with frames already written
    assert not out.exists() and _no_temp_files(tmp_path)
    # an existing output is kept as it was
    out.write_bytes(b"old")
    code, _, _ = _run(capsys, "decode", lat, "-o", out, *WAN, "--force")
    assert code == status and out.read_bytes() == b"old" and _no_temp_files(tmp_path)


def test_encode_reads_the_video_as_it_encodes(tmp_path, capsys, monkeypatch):
    src = _video(tmp_path, "clip.mp4", t=13, fps=10)
    events: list = []
    real_chunks = media.video_chunks

    def chunks(*args, **kwargs):
        for c in real_chunks(*args, **kwargs):
            events.append(("read", c.shape[0]))
            yield c

    real_encode = qv.stream.encode_frames

    def encode_frames(*args, **kwargs):
        for z in real_encode(*args, **kwargs):
            events.append(("encoded", z.shape[2]))
            yield z

    def whole(*args, **kwargs):
        raise AssertionError("the clip was read whole")

    monkeypatch.setattr(media, "video_chunks", chunks)
    monkeypatch.setattr(media, "read_video", whole)
    monkeypatch.setattr(qv.stream, "encode_frames", encode_frames)
    lat = tmp_path / "z.safetensors"
    code, _, err = _run(capsys, "encode", src, "-o", lat, *WAN, "--tile", "24")
    assert code == 0, err
    assert events[:3] == [("read", 4), ("encoded", 1), ("read", 4)]  # latents come while the file is read
    assert [n for kind, n in events if kind == "read"] == [4, 4, 4, 1]
    assert _latent(lat).shape == (1, 16, 4, 4, 4)


@pytest.mark.parametrize(("fit", "policy", "t"), [("crop", "pad", 7), ("pad", "trim", 10), ("pad", None, 9)])
def test_streamed_encode_equals_untiled_after_fitting(tmp_path, capsys, fit, policy, t):
    """Fitting chunk by chunk (crop/pad the sides, trim/pad the frame count at the stream's end)
    gives the untiled encoder's latents of the whole clip fitted at once."""
    src = _video(tmp_path, "clip.mp4", t=t, fps=10, size=36)
    lat = tmp_path / "z.safetensors"
    argv = ["encode", src, "-o", lat, *WAN, "--tile", "24", "--fit", fit] + (["--frames", policy] if policy else [])
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    frames, _ = media.read_video(src)
    frames = frames[:, 2:34, 2:34] if fit == "crop" else np.pad(frames, ((0, 0), (0, 4), (0, 4), (0, 0)), "edge")
    if policy == "trim":
        frames = frames[:9]
    elif policy == "pad":
        frames = np.concatenate([frames, np.repeat(frames[-1:], 9 - t, axis=0)])
    vae = random_vae("wan2.1", tiny=True)
    with torch.no_grad():
        ref = vae.encode(media.to_tensor(frames).permute(1, 0, 2, 3).unsqueeze(0)).latent_dist.mode()
    z = _latent(lat)
    assert z.shape == ref.shape and (z - ref).abs().max() <= 1e-4
    meta = _meta(lat)
    assert meta["frames"] == str(t) and meta["frames_encoded"] == "9" and meta["fit"] == fit

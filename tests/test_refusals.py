"""Bad input is refused cleanly and early: the API raises ``qv.InvalidInputError``, the command line
prints ``error: ...`` and exits 2, never with a traceback (issue 10, item 4)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import quadtree_vae as qv
from quadtree_vae import media
from quadtree_vae.cli import main
from quadtree_vae.options import Options, parse_bytes

SD = ["--vae", "random:sd:tiny"]
BAD_BUDGETS = ["1,5GB", "1.2.3GB", "0x10", "1e400", "nan", "inf", "-1GB", "", "GB", math.nan, math.inf, -5, True]


def refuses(match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(qv.InvalidInputError, match=match):
        fn(*args, **kwargs)


def cli_refuses(capsys, match: str, *argv) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert match in err, err


# ---------------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("budget", BAD_BUDGETS)
def test_bad_budgets(sd, budget):
    refuses("memory size", qv.decode, sd, torch.zeros(1, 4, 4, 4), budget=budget)
    refuses("memory size", Options, budget=budget)


def test_good_budgets():
    assert parse_bytes("4GB") == 4 * 2**30
    assert parse_bytes(" 1.5 mb") == int(1.5 * 2**20)
    assert parse_bytes(".5k") == 512
    assert parse_bytes(123) == 123 and parse_bytes(np.int64(7)) == 7


def test_integral_tiles_are_accepted_and_the_rest_refused(sd):
    z = torch.randn(1, 4, 8, 8)
    ref = qv.decode(sd, z, tile=32)
    for tile in (32.0, np.int64(32), (np.int32(32), 32.0)):
        assert torch.equal(qv.decode(sd, z, tile=tile), ref)
    for tile in (32.5, "32", True, math.nan, (32,), (32, 32, 32)):
        refuses("tile must be an int", qv.decode, sd, z, tile=tile)


@pytest.mark.parametrize("shape", [(1, 3, -8, 64), (1, 3, "a", 64), (1, 3, 8.5, 64), "1x3x8x8", 5])
def test_bad_plan_shapes(sd, shape):
    refuses("shape", qv.plan, sd, shape, op="encode")


def test_bad_progress_plan_dtype_and_devices(sd):
    z = torch.zeros(1, 4, 4, 4)
    refuses("progress must be a callable", qv.decode, sd, z, progress=5)
    refuses("plan must be a Plan", qv.decode, sd, z, plan="not a plan")
    refuses("dtype must be a floating-point", qv.plan, sd, (1, 4, 4, 4), dtype=torch.int8)
    refuses("unknown device 'bogus'", qv.decode, sd, z, output_device="bogus")
    refuses("meta", qv.decode, sd, z, output_device="meta")
    refuses("device must be", qv.decode, sd, z, output_device=3)
    if not torch.cuda.is_available():
        refuses("CUDA is not available", qv.decode, sd, z, output_device="cuda")
    refuses("meta", qv.plan, sd, (1, 4, 4, 4), device="meta")
    refuses("mode must be one of", qv.plan, sd, (1, 4, 4, 4), mode=None)


def test_enable_checks_the_same_options(sd):
    refuses("memory size", qv.enable, sd, budget="1,5GB")
    refuses("progress must be a callable", qv.enable, sd, progress=5)
    refuses("fallback must be one of", qv.enable, sd, fallback="stock")
    assert not qv.hooks.is_enabled(sd)


def test_no_room_names_the_free_memory_not_a_dash(sd, monkeypatch):
    monkeypatch.setattr("quadtree_vae.planner.available_memory", lambda device: 1000)
    with pytest.raises(qv.InvalidInputError, match="free memory") as info:
        qv.plan(sd, (1, 3, 256, 256))
    assert "- leaves" not in str(info.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x 1000: Pillow's error band
    refuses("refused: Image size", media.read_image, path)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("budget", ["1,5GB", "1.2.3GB", "0x10", "1e400", "nan", "inf"])
def test_cli_bad_budgets(capsys, budget):
    cli_refuses(capsys, "memory size", "inspect", "--size", "64", *SD, "--budget", budget)


def test_cli_bad_devices(capsys):
    cli_refuses(capsys, "meta", "inspect", "--size", "64", *SD, "--device", "meta")
    cli_refuses(capsys, "unknown device", "inspect", "--size", "64", *SD, "--device", "bogus")


def test_cli_decompression_bomb(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    cli_refuses(capsys, "refused", "encode", path, "-o", tmp_path / "z.safetensors", *SD)
    assert not (tmp_path / "z.safetensors").exists()


@pytest.mark.parametrize("meta,match", [
    ({"frames_padded": "abc"}, "frames_padded"),
    ({"frames_padded": -2}, "frames_padded"),
    ({"fit": "pad", "source_size": "big"}, "source_size"),
    ({"fit": "pad", "source_size": [64, "x"]}, "source_size"),
    ({"fit": "pad", "source_size": [64]}, "source_size"),
    ({"fit": "stretch"}, "fit"),
])
def test_cli_malformed_latent_metadata(tmp_path, capsys, meta, match):
    lat = tmp_path / "z.safetensors"
    media.save_latent(lat, torch.zeros(1, 4, 8, 8), meta)
    cli_refuses(capsys, f"malformed metadata {match}", "decode", lat, "-o", tmp_path / "x.png", *SD)
    cli_refuses(capsys, f"malformed metadata {match}", "inspect", lat, *SD)
    assert not (tmp_path / "x.png").exists()


def test_cli_no_room_without_budget(capsys, monkeypatch):
    monkeypatch.setattr("quadtree_vae.planner.available_memory", lambda device: 1000)
    cli_refuses(capsys, "free memory", "inspect", "--size", "16384x16384", *SD)


# ------------------------------------------------------------------------- silent wrong results


def test_cli_16bit_png_is_encoded_with_its_16_bits(tmp_path, capsys):
    """A 16-bit PNG was clipped to white by convert("RGB"); now its 16 bits reach the model."""
    grad = (np.arange(64 * 64).reshape(64, 64) * 16 + 3).astype(np.uint16)
    src, lat = tmp_path / "g16.png", tmp_path / "z.safetensors"
    Image.fromarray(grad).save(src)
    assert main(["encode", str(src), "-o", str(lat), *SD, "--tile", "32", "-q"]) == 0
    z, _, _ = media.load_latent(lat)
    x = torch.from_numpy(grad / 32767.5 - 1.0).float().expand(1, 3, 64, 64)
    with torch.no_grad():
        ref = qv.random_vae("sd", tiny=True).encode(x).latent_dist.mode()
    assert float((z - ref).abs().max()) <= 1e-4


def test_32bit_image_is_refused(tmp_path, capsys):
    Image.fromarray(np.ones((64, 64), np.float32)).save(tmp_path / "f.tif")
    cli_refuses(capsys, "no defined white level", "encode", tmp_path / "f.tif", "-o", tmp_path / "z.safetensors", *SD)


def _png(path, size=64):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_output_is_never_the_input(tmp_path, capsys, monkeypatch, how):
    """`roundtrip same.png -o same.png --force` overwrote the source; real paths are compared."""
    src = _png(tmp_path / "same.png")
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    out = {"same": src, "dotted": "./sub/../same.png", "symlink": tmp_path / "link.png",
           "hardlink": tmp_path / "hard.png"}[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        out.symlink_to(src)
    if how == "hardlink":
        out.hardlink_to(src)
    for argv in (["roundtrip", src, "-o", out], ["roundtrip", out, "-o", src], ["inspect", src, "--plot", out]):
        cli_refuses(capsys, "is the input file", *argv, *SD, "--force")
    assert src.read_bytes() == before


def test_decode_onto_its_latent_file_is_refused(tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    media.save_latent(lat, torch.zeros(1, 4, 8, 8), {})
    link = tmp_path / "z.png"
    link.symlink_to(lat)
    cli_refuses(capsys, "is the input file", "decode", lat, "-o", link, *SD, "--force")


def _over_budget(vae, shape, op):
    """A budget just above the tensors held between segments: room for no tile, so the plan's peak
    exceeds it (the tiles cannot be split below one latent pixel, attention needs the whole frame)."""
    held = qv.plan(vae, shape, budget="1GB", op=op).cut_bytes
    budget = held + 128 * 2**10
    assert qv.plan(vae, shape, budget=budget, op=op).peak > budget  # the case under test
    return budget


def test_a_budget_that_cannot_be_met_is_refused_before_work(sd, monkeypatch):
    x = torch.zeros(1, 3, 256, 256)
    budget = _over_budget(sd, x.shape, "encode")
    p = qv.plan(sd, x.shape, budget=budget)  # still returned for inspection, and says so
    assert "exceeds the budget" in p.describe()
    monkeypatch.setattr("quadtree_vae.api.execute", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(qv.InvalidInputError, match="cannot be met") as info:
        qv.encode(sd, x, budget=budget)
    assert "whole frame" in str(info.value) or "smallest tiles" in str(info.value)
    with pytest.warns(UserWarning, match="exceeds its budget"):  # a plan passed back runs as the caller chose
        monkeypatch.setattr("quadtree_vae.api.execute", lambda *a, **k: torch.zeros(1, 4, 32, 32))
        qv.encode(sd, x, plan=p)
    assert "exceeds" not in qv.plan(sd, x.shape, budget="1GB").describe()


def test_cli_budget_that_cannot_be_met(tmp_path, capsys, monkeypatch):
    src = _png(tmp_path / "a.png", 256)
    budget = _over_budget(qv.random_vae("sd", tiny=True), (1, 3, 256, 256), "encode")
    monkeypatch.setattr("quadtree_vae.api.execute", lambda *a, **k: pytest.fail("ran the model"))
    for cmd in ("encode", "roundtrip"):
        out = tmp_path / ("z.safetensors" if cmd == "encode" else "rt.png")
        cli_refuses(capsys, "cannot be met", cmd, src, "-o", out, *SD, "--budget", budget, "-q")
        assert not out.exists()
    assert main(["inspect", str(src), *SD, "--budget", str(budget), "--op", "encode"]) == 0
    captured = capsys.readouterr()
    assert "exceeds the budget" in captured.out and "would refuse" in captured.err


# ------------------------------------------------------------------ refused before the work starts


def _no_model_run(monkeypatch):
    monkeypatch.setattr("quadtree_vae.api.execute", lambda *a, **k: pytest.fail("ran the model"))


def test_unwritable_output_folder_is_refused_before_work(tmp_path, capsys, monkeypatch):
    """The error names the user's path, not the hidden temporary file, and comes before the encode."""
    src = _png(tmp_path / "a.png")
    _no_model_run(monkeypatch)
    cli_refuses(capsys, "/proc/qvae-out.safetensors: cannot write in the folder /proc", "encode", src,
                "-o", "/proc/qvae-out.safetensors", *SD)
    cli_refuses(capsys, "cannot write in the folder", "roundtrip", src, "-o", "/proc/qvae-out.png", *SD)
    cli_refuses(capsys, "cannot write in the folder", "inspect", src, "--plot", "/proc/qvae-out.png", *SD)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere: only the /proc case tests it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cli_refuses(capsys, f"{locked / 'z.safetensors'}: cannot write", "encode", src, "-o",
                    locked / "z.safetensors", *SD)


def test_a_failed_write_names_the_users_file(tmp_path, monkeypatch):
    def full_disk(tmp, *a, **k):
        raise OSError(28, "No space left on device", str(tmp))

    monkeypatch.setattr(media, "_write_image", full_disk)
    with pytest.raises(OSError, match="cannot write .*out.png: No space left") as info:
        media.write_media(tmp_path / "out.png", np.zeros((1, 8, 8, 3), np.uint8), None)
    assert ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_odd_sides_for_mp4_are_refused_before_work(tmp_path, capsys, monkeypatch):
    """--fit pad is undone on decode, so the output has the input's odd sides, which .mp4 cannot hold."""
    gif = tmp_path / "odd.gif"
    media.write_media(gif, np.zeros((3, 33, 35, 3), np.uint8), None)
    png = tmp_path / "odd.png"
    Image.new("RGB", (35, 33)).save(png)
    lat = tmp_path / "z.safetensors"
    assert main(["encode", str(png), "-o", str(lat), *SD, "--fit", "pad", "-q"]) == 0
    capsys.readouterr()
    _no_model_run(monkeypatch)
    for argv in (["roundtrip", gif, "-o", tmp_path / "x.mp4", "--fit", "pad"],
                 ["roundtrip", png, "-o", tmp_path / "x.webm", "--fit", "pad"],
                 ["decode", lat, "-o", tmp_path / "x.mp4"]):
        cli_refuses(capsys, "needs an even height and width, the output would be 33x35", *argv, *SD, "-q")
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.webm").exists()


def test_cli_absent_cuda_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    src = _png(tmp_path / "a.png")
    monkeypatch.setattr(media, "read_media", lambda *a, **k: pytest.fail("read the input"))
    cli_refuses(capsys, "CUDA is not available", "encode", src, "-o", tmp_path / "z.safetensors", *SD,
                "--device", "cuda")


def test_demo_refuses_a_missing_out_folder(tmp_path, capsys):
    cli_refuses(capsys, "the folder does not exist", "demo", *SD, "--out", tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "file").write_text("x")
    cli_refuses(capsys, "is a file, not a folder", "demo", *SD, "--out", tmp_path / "file")


def test_fallback_is_not_a_cli_flag(tmp_path, capsys):
    """The loaders build only classes the engine tiles, so --fallback full could never apply on the
    command line: the flag is gone there (the API, qv.enable and ComfyUI keep fallback="full")."""
    src = _png(tmp_path / "a.png")
    assert main(["encode", str(src), "-o", str(tmp_path / "z.safetensors"), *SD, "--fallback", "full"]) == 2
    assert "unrecognized arguments: --fallback full" in capsys.readouterr().err
    assert not (tmp_path / "z.safetensors").exists()


def test_unsupported_diffusers_folder_is_refused_naming_its_class(tmp_path, capsys):
    from diffusers import AutoencoderTiny

    folder = tmp_path / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    src = _png(tmp_path / "a.png")
    cli_refuses(capsys, "unsupported model class 'AutoencoderTiny'", "encode", src, "-o", tmp_path / "z.safetensors",
                "--vae", folder)


def test_fallback_full_runs_an_unsupported_model_untiled_from_python():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval()
    z = torch.randn(1, 4, 4, 4)
    refuses_type = pytest.raises(qv.UnsupportedArchitectureError, match="AutoencoderTiny")
    with refuses_type:
        qv.decode(tiny, z)
    with pytest.warns(UserWarning, match="untiled"):
        y = qv.decode(tiny, z, fallback="full")
    with torch.no_grad():
        assert torch.equal(y, tiny.decode(z).sample)

"""Bad input is refused cleanly and early: the API raises ``qv.InvalidInputError``, the command line
prints ``error: ...`` and exits 2, never with a traceback (issue 10, item 4)."""

from __future__ import annotations

import math

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

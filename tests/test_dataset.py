"""Dataset encoding (qvae cache / qv.encode_dataset): index, failures, resume, exactness, torchrun ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_diff, torchrun, untiled_encode

import quadtree_vae as qv
from quadtree_vae import cli, media
from quadtree_vae.dataset import INDEX_NAME, Item, collect_items, encode_dataset, nearest_bucket
from quadtree_vae.loading import random_vae

WAN = "random:wan2.1:tiny"
TILE = 32  # several tiles on every item below (the sides are 32..48 px)
GOOD = ("a.png", "b.png", "c.webp", "clips/m.mp4", "clips/n.mp4", "sub/d.png")
BAD = "sub/broken.png"


def _write_items(folder: Path) -> None:
    rng = np.random.default_rng(0)

    def pixels(t: int, h: int, w: int) -> np.ndarray:
        ramp = np.linspace(0, 200, w, dtype=np.float32)[None, None, :, None]
        return (ramp + rng.integers(0, 55, (t, h, w, 3))).astype(np.uint8)

    for sub in ("clips", "sub"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    media.write_media(folder / "a.png", pixels(1, 32, 48), None)
    media.write_media(folder / "b.png", pixels(1, 40, 40), None)
    media.write_media(folder / "c.webp", pixels(1, 48, 32), None)
    media.write_media(folder / "sub" / "d.png", pixels(1, 32, 32), None)
    media.write_media(folder / "clips" / "m.mp4", pixels(5, 32, 40), 16)
    media.write_media(folder / "clips" / "n.mp4", pixels(5, 40, 32), 8)
    (folder / BAD).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


@pytest.fixture(scope="module")
def items_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("items")
    _write_items(folder)
    return folder


@pytest.fixture(scope="module")
def wan():
    return random_vae("wan2.1", tiny=True)


@pytest.fixture(scope="module")
def single(items_dir, wan, tmp_path_factory):
    """One single-process run over the items: (output folder, report)."""
    out = tmp_path_factory.mktemp("single")
    return out, encode_dataset(wan, items_dir, out, tile=TILE, progress=False, vae_name=WAN)


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]


def _latent(out: Path, record: dict) -> torch.Tensor:
    return media.load_latent(out / record["latent"])[0]


def _model_input(path: str) -> torch.Tensor:
    src = media.read_media(path)
    return media.to_tensor(src.frames).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, H, W)


# ------------------------------------------------------------------------------------ single process


def test_index_reports_every_item_once_and_the_corrupt_one(single, items_dir):
    out, report = single
    index = _index(out)
    assert [r["source"] for r in index] == sorted(GOOD + (BAD,))
    assert index == json.loads(json.dumps(report.records))
    bad = [r for r in index if r["status"] == "failed"]
    assert [r["source"] for r in bad] == [BAD] and "cannot read the image" in bad[0]["error"]
    assert bad[0]["latent"] is None and not report.ok
    assert {r["status"] for r in index if r["source"] != BAD} == {"written"}
    files = sorted(p.name for p in out.iterdir() if p.name != INDEX_NAME)
    assert files == sorted(r["latent"] for r in index if r["latent"])  # one file per good item, no leftovers


def test_latents_equal_direct_and_untiled_encode(single, wan):
    out, report = single
    for r in report.records:
        if r["status"] == "failed":
            continue
        x = _model_input(r["path"])
        z = _latent(out, r)
        assert max_diff(z, untiled_encode(wan, x)) <= 1e-4, r["source"]
        assert max_diff(z, qv.encode(wan, x, tile=TILE)) <= 1e-4, r["source"]


def test_metadata_says_where_it_came_from(single, wan):
    out, report = single
    clip = next(r for r in report.records if r["source"] == "clips/n.mp4")
    assert clip["frames"] == 5 and clip["fps"] == "8" and clip["source_size"] == [40, 32]
    _, meta, _ = media.load_latent(out / clip["latent"])
    assert meta["source"] == "clips/n.mp4" and Path(meta["source_path"]).name == "n.mp4"
    assert meta["fingerprint"] == qv.loading.fingerprint(wan)
    assert media.meta_value(meta, "random_weights") is True
    assert media.meta_value(meta, "frames") == 5 and meta["fps"] == "8"
    assert media.meta_value(meta, "shape") == list(_latent(out, clip).shape)


def test_resume_skips_verified_items_and_redoes_damaged_ones(items_dir, wan, tmp_path):
    out = tmp_path / "out"
    sources = [items_dir / "a.png", items_dir / "b.png", items_dir / "sub"]  # keys a.png, b.png, broken.png, d.png
    first = encode_dataset(wan, sources, out, tile=TILE, progress=False)
    written = {r["source"]: r for r in first.records if r["status"] == "written"}
    stamps = {s: (out / r["latent"]).stat().st_mtime_ns for s, r in written.items()}
    damaged = out / written["b.png"]["latent"]
    damaged.write_bytes(damaged.read_bytes()[:-8])  # truncated: fails verification
    stale = out / f".{Path(written['a.png']['latent']).stem}.x1y2.tmp.safetensors"
    stale.write_bytes(b"partial")  # what a killed run leaves behind

    again = encode_dataset(wan, sources, out, tile=TILE, progress=False)
    status = {r["source"]: r["status"] for r in again.records}
    assert status.pop("b.png") == "written" and status.pop("broken.png") == "failed"
    assert set(status.values()) == {"verified"}
    for s in status:
        assert (out / written[s]["latent"]).stat().st_mtime_ns == stamps[s]
    assert not stale.exists()
    assert max_diff(_latent(out, written["b.png"]), untiled_encode(wan, _model_input(written["b.png"]["path"]))) <= 1e-4

    other = encode_dataset(wan, sources, out, tile=TILE, progress=False, fit="crop")  # other settings: redo
    assert {r["status"] for r in other.records} == {"written", "failed"}


def test_buckets_resize_and_a_2d_vae_encodes_clips_frame_by_frame(items_dir, tmp_path):
    sd = random_vae("sd", tiny=True)
    out = tmp_path / "out"
    buckets = [(32, 32), (32, 48), (48, 32)]
    report = encode_dataset(sd, [items_dir / "a.png", items_dir / "clips"], out, buckets=buckets, progress=False)
    assert report.ok
    by = {r["source"]: r for r in report.records}
    assert by["a.png"]["bucket"] == [32, 48] and by["a.png"]["shape"] == [1, 4, 4, 6]
    assert by["n.mp4"]["bucket"] == [48, 32] and by["n.mp4"]["shape"] == [5, 4, 6, 4]  # 40x32 -> 48x32
    src = media.read_media(by["n.mp4"]["path"])
    from PIL import Image

    frames = np.stack([np.asarray(Image.fromarray(f).resize((38, 48), Image.LANCZOS)) for f in src.frames])
    x = media.to_tensor(frames[:, :, 3:35])  # scaled to cover 48x32, centre crop
    assert max_diff(_latent(out, by["n.mp4"]), untiled_encode(sd, x)) <= 1e-4


def test_nearest_bucket_compares_aspect_ratios_on_a_log_scale():
    buckets = [(64, 64), (32, 64), (64, 32)]
    assert nearest_bucket(100, 100, buckets) == (64, 64)
    assert nearest_bucket(100, 180, buckets) == (32, 64)
    assert nearest_bucket(190, 100, buckets) == (64, 32)
    assert nearest_bucket(100, 141, buckets) == (64, 64)  # sqrt(2): closer to 1:1 than to 1:2 on a log scale
    assert nearest_bucket(100, 142, buckets) == (32, 64)


def test_collect_items_from_manifests_and_globs(items_dir, tmp_path):
    txt = tmp_path / "list.txt"
    txt.write_text(f"# a comment\n\n{items_dir / 'a.png'}\n{items_dir / 'clips' / 'm.mp4'}\n")
    assert [Path(i.path).name for i in collect_items(txt)] == ["a.png", "m.mp4"]
    rel = items_dir / "list.jsonl"
    rel.write_text(json.dumps({"path": "sub/d.png", "caption": "x"}) + "\n" + json.dumps({"path": "b.png"}) + "\n")
    try:
        got = collect_items(rel)
    finally:
        rel.unlink()
    assert got == [Item("sub/d.png", str(items_dir / "sub" / "d.png")), Item("b.png", str(items_dir / "b.png"))]
    assert {Path(i.path).name for i in collect_items(str(items_dir / "**" / "*.png"))} == {"a.png", "b.png", "d.png",
                                                                                        "broken.png"}
    with pytest.raises(qv.InvalidInputError, match="no images or videos"):
        collect_items(str(tmp_path / "nothing*.png"))
    names = [i.name for i in collect_items(items_dir)]
    assert len(set(names)) == len(names)


def test_cli_exit_status_and_refusals(items_dir, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(str(items_dir / g) for g in GOOD[:2]))
    base = ["cache", "--vae", WAN, "--tile", str(TILE), "-q", "-o"]
    assert cli.main([*base, str(tmp_path / "o1"), str(good)]) == 0
    assert cli.main([*base, str(tmp_path / "o2"), str(items_dir / BAD)]) == 1
    assert f"{BAD.split('/')[-1]}" in capsys.readouterr().err
    assert cli.main([*base, str(tmp_path / "o3"), str(good), "--size", "30x40"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    assert cli.main([*base, str(tmp_path / "o4"), str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["cache", "--vae", WAN, "--tile", "8", "-q", "-o", str(tmp_path / "o5"), str(good)]) == 2
    assert "tile" in capsys.readouterr().err and not (tmp_path / "o5").exists()


# ----------------------------------------------------------------------------------------- torchrun

_WRAPPER = """
import os, sys
import safetensors.torch as st
from quadtree_vae import cli

die = os.environ.get("QVAE_TEST_DIE")  # "RANK:N": that rank dies while writing its (N+1)-th latent
if die and int(os.environ["RANK"]) == int(die.split(":")[0]):
    real, written = st.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        if written[0] == int(die.split(":")[1]):
            with open(filename, "wb") as f:
                f.write(b"partial")
            os._exit(17)
        written[0] += 1
        return real(tensors, filename, metadata=metadata)

    st.save_file = save_file
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_ranks_survive_a_killed_rank_and_match_one_process(single, items_dir, tmp_path):
    ref_out, ref = single
    script = tmp_path / "run_cache.py"
    script.write_text(_WRAPPER)
    out = tmp_path / "out"
    args = ["cache", str(items_dir), "-o", str(out), "--vae", WAN, "--tile", str(TILE), "-q", "--device", "cpu"]

    killed = torchrun(script, args, env={"QVAE_TEST_DIE": "1:1"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert any(p.name.endswith(".tmp.safetensors") for p in out.iterdir())  # the killed write left a partial
    assert not (out / INDEX_NAME).exists()

    rerun = torchrun(script, args)
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # the corrupt item
    index = _index(out)
    assert [r["source"] for r in index] == [r["source"] for r in ref.records]
    status = {r["source"]: r["status"] for r in index}
    assert status.pop(BAD) == "failed"
    assert set(status.values()) == {"verified", "written"}  # the first run did part of the work
    assert {r["rank"] for r in index} == {0, 1}
    files = sorted(p.name for p in out.iterdir() if p.name != INDEX_NAME)
    assert files == sorted(r["latent"] for r in ref.records if r["latent"])  # exactly once, no partials
    for r in ref.records:
        if r["latent"]:
            assert max_diff(_latent(out, r), _latent(ref_out, r)) <= 1e-4, r["source"]

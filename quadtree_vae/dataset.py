"""Encoding a whole dataset of images and videos into latent files ("latent caching").

Training tools encode their dataset once and train on the stored latents, so a latent that is
wrong, half-written or silently made with other settings costs a training run. Hence:

* Every item goes through :func:`quadtree_vae.encode` (exact tiled, memory-bounded) and becomes one
  ``.safetensors`` file (key "latent", the same layout as ``qvae encode``) whose metadata says where
  it came from (source, sizes, frames, fps), what made it (VAE fingerprint, random-weights flag,
  the settings that change the latent) and a SHA-256 of the latent itself.
* Resumable: an item whose file exists, reads back, hashes right and was made from the same source
  with the same model and settings is skipped ("verified"); anything else is encoded again. Files
  are written atomically, so a killed run leaves at most a temporary file, removed on the next run.
* One bad item (unreadable, wrong frame count, ...) is recorded in the index with its error and the
  run goes on; :attr:`DatasetReport.ok` (and the command's exit status) tells whether all went well.
* Under ``torch.distributed`` (``torchrun``, one or several machines) item ``i`` belongs to rank
  ``i % world_size`` of the list rank 0 made, so every item is written exactly once and a rerun,
  with any number of ranks, finishes what is missing. Coordination (item list, fingerprints, the
  index) runs over a gloo group, so it works the same with NCCL on GPUs; the output folder must be
  one shared folder when several machines take part.
* The index (``index.jsonl``, one JSON object per item, in item order) is rebuilt by rank 0 at the
  end of every complete run from all ranks' records: each item appears once.

Sources: a folder (searched recursively for images and videos), a glob pattern, a manifest
(``.txt``: one path per line, ``#`` comments; ``.jsonl``: objects with a ``"path"``), or a single
file; relative manifest paths are relative to the manifest. Optional resizing follows training
tools: ``size=(H, W)`` or the ``buckets`` entry nearest in aspect ratio, reached by scaling the
frames to cover it (Lanczos) and cropping the centre.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import api, media
from .errors import InvalidInputError, QuadtreeVAEError, UnsupportedArchitectureError
from .loading import describe, fingerprint, parse_vae_spec
from .options import Options

__all__ = ["INDEX_NAME", "DatasetReport", "Item", "collect_items", "encode_dataset", "nearest_bucket"]

INDEX_NAME = "index.jsonl"
DATASET_VERSION = "1"
_MANIFEST_PATH_KEYS = ("path", "file", "video", "image")
_FITS = ("crop", "pad")
_POLL_S = 0.2


# ------------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One image or video: ``key`` names it (its path relative to the folder it was found in, as
    written in the manifest, or as the glob matched it), ``path`` is where it is read from."""

    key: str
    path: str

    @property
    def name(self) -> str:
        """The latent file's name: readable stem plus a digest of the key, so names never clash."""
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(self.key).stem)[:60] or "item"
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:12]
        return f"{stem}-{digest}{media.LATENT_EXT}"


def collect_items(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str] | Item]) -> list[Item]:
    """The items named by ``sources`` (folders, globs, manifests, files, Items), in a deterministic order:
    sources in the order given, each one's items sorted by key. Raises InvalidInputError when a
    source names nothing, or when two items would get the same key."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    items: list[Item] = []
    for src in sources:
        found = [src] if isinstance(src, Item) else _from_source(os.fspath(src))
        if not found:
            raise InvalidInputError(f"{src}: no images or videos found")
        items += found
    seen: dict[str, str] = {}
    for it in items:
        if seen.setdefault(it.key, it.path) != it.path:
            raise InvalidInputError(f"two items share the name {it.key!r}: {seen[it.key]} and {it.path}; "
                                    "give them as separate runs or through one manifest")
    unique = {it.path: it for it in items}  # the same file named twice is encoded once
    return list(unique.values())


def _is_media(path: str) -> bool:
    return Path(path).suffix.lower() in media.IMAGE_READ + media.VIDEO_READ


def _from_source(src: str) -> list[Item]:
    p = Path(src).expanduser()
    if p.is_dir():
        return _from_folder(p)
    if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"):
        return _from_manifest(p)
    if p.is_file():
        if not _is_media(str(p)):
            media.kind_of(p)  # raises, naming the extensions that work
            raise InvalidInputError(f"{p}: expected an image or a video, got a latent file")
        return [Item(p.name, str(p.resolve()))]
    if glob.has_magic(src):
        matches = sorted(m for m in glob.glob(os.path.expanduser(src), recursive=True) if _is_media(m))
        return [Item(Path(m).as_posix(), str(Path(m).resolve())) for m in matches if Path(m).is_file()]
    raise InvalidInputError(f"{src}: no such file, folder or glob match")


def _from_folder(root: Path) -> list[Item]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if _is_media(f) and not f.startswith("."):
                path = Path(dirpath) / f
                found.append(Item(path.relative_to(root).as_posix(), str(path.resolve())))
    return sorted(found, key=lambda it: it.key)


def _from_manifest(manifest: Path) -> list[Item]:
    """Entries of a .txt (one path per line) or .jsonl (objects with "path") manifest, in file order."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{manifest}: cannot read the manifest ({e})") from None
    items = []
    for n, line in enumerate(lines, 1):
        entry = _manifest_entry(manifest, n, line.strip())
        if entry is not None:
            path = Path(entry).expanduser()
            full = path if path.is_absolute() else manifest.parent / path
            items.append(Item(entry, str(full.resolve())))
    return items


def _manifest_entry(manifest: Path, n: int, line: str) -> str | None:
    if not line or line.startswith("#"):
        return None
    if manifest.suffix.lower() == ".txt":
        return line
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise InvalidInputError(f"{manifest}:{n}: not a JSON object ({e})") from None
    path = next((obj[k] for k in _MANIFEST_PATH_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), str)), None)
    if path is None:
        raise InvalidInputError(f"{manifest}:{n}: expected an object with a \"path\" string, got {line[:80]!r}")
    return path


# ------------------------------------------------------------------------------------- resizing


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (H, W) whose aspect ratio is nearest to ``height x width`` on a log scale (so 2:1
    and 1:2 are equally far from 1:1); the first listed wins a tie."""
    if not buckets:
        raise InvalidInputError("nearest_bucket: give at least one bucket")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def _cover_crop(frames: np.ndarray, target: tuple[int, int]) -> tuple[np.ndarray, list[int], list[int]]:
    """Scale (T, H, W, 3) frames to cover ``target`` keeping the aspect ratio, then crop the centre.
    Returns the frames, the scaled size and the crop offset."""
    from PIL import Image

    h, w = frames.shape[1:3]
    th, tw = target
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (rh, rw) != (h, w):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.LANCZOS)) for f in frames])
    top, left = (rh - th) // 2, (rw - tw) // 2
    return frames[:, top:top + th, left:left + tw], [rh, rw], [top, left]


def _fit_multiple(frames: np.ndarray, fit: str | None, multiple: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Sides that are not multiples of ``multiple``: refuse, centre-crop down or edge-pad up."""
    h, w = frames.shape[1:3]
    if h % multiple == 0 and w % multiple == 0:
        return frames, {}
    if fit is None:
        raise InvalidInputError(f"{h}x{w} (HxW) is not a multiple of {multiple}; pass a size, buckets, "
                                "or fit 'crop' / 'pad'")
    if fit == "crop":
        eh, ew = h // multiple * multiple, w // multiple * multiple
        if min(eh, ew) == 0:
            raise InvalidInputError(f"{h}x{w} is too small to crop to a multiple of {multiple}")
        top, left = (h - eh) // 2, (w - ew) // 2
        return frames[:, top:top + eh, left:left + ew], {"fit": "crop", "crop_offset": [top, left]}
    eh, ew = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    return np.pad(frames, ((0, 0), (0, eh - h), (0, ew - w), (0, 0)), mode="edge"), {"fit": "pad"}


# --------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Settings:
    """Everything that decides an item's latent besides its source (tile and budget do not: exact)."""

    fingerprint: str
    dtype: str
    mode: str
    frames: str
    size: tuple[int, int] | None
    buckets: tuple[tuple[int, int], ...] | None
    fit: str | None

    def as_json(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "dtype": self.dtype, "mode": self.mode,
                           "frames": self.frames, "size": self.size, "buckets": self.buckets, "fit": self.fit},
                          sort_keys=True)


_Sizes = tuple[tuple[int, int] | None, tuple[tuple[int, int], ...] | None]


def _check_sizes(size, buckets, fit, multiple: int) -> _Sizes:
    """(size, buckets) as tuples, after checking they are (H, W) multiples of the model's factor."""
    if size is not None and buckets:
        raise InvalidInputError("give a size or buckets, not both")
    if fit is not None and fit not in _FITS:
        raise InvalidInputError(f"fit={fit!r}: expected one of {', '.join(_FITS)} or None")
    targets = [tuple(size)] if size is not None else [tuple(b) for b in buckets or ()]
    for t in targets:
        if len(t) != 2 or any(not isinstance(v, int) or v <= 0 or v % multiple for v in t):
            raise InvalidInputError(f"size/bucket {t}: expected (height, width), positive multiples of {multiple}")
    return (tuple(size) if size is not None else None), (tuple(tuple(b) for b in buckets) if buckets else None)


# ------------------------------------------------------------------------------------------ ranks


class _Ranks:
    """This process's place in the run, and the few collectives the run needs (over gloo, so CPU
    objects travel the same way whatever backend the default group uses)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank, self.world, self.group, self.store = 0, 1, None, None
        if self.dist is None:
            return
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.group = group if backend == "gloo" else dist.new_group(dist.get_process_group_ranks(group)
                                                                     if group is not None else None,
                                                                     backend="gloo")
        self.store = dist.distributed_c10d._get_default_store()

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        return self.dist.get_global_rank(self.group, rank) if self.group is not None else rank


class _Progress:
    """Items done by all ranks, counted in the process group's store; rank 0 shows the bar."""

    def __init__(self, ranks: _Ranks, run_id: str, total: int, show: bool | None):
        self.ranks = ranks
        self.done_key, self.finished_key = f"qvae/cache/{run_id}/done", f"qvae/cache/{run_id}/finished"
        self.bar = None
        self.finished = False
        if ranks.rank == 0 and show is not False:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="cache", unit="item", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.25, disable=None if show is None else False)

    def step(self) -> None:
        done = self.ranks.store.add(self.done_key, 1) if self.ranks.store is not None else None
        self._show(done)

    def _show(self, done: int | None) -> None:
        if self.bar is not None:
            self.bar.update((done if done is not None else self.bar.n + 1) - self.bar.n)

    def wait_all(self) -> None:
        """Mark this rank finished; rank 0 keeps the bar moving until every rank is."""
        self._mark_finished()
        store = self.ranks.store
        if store is not None and self.bar is not None:
            while store.add(self.finished_key, 0) < self.ranks.world:
                self._show(store.add(self.done_key, 0))
                time.sleep(_POLL_S)
            self._show(store.add(self.done_key, 0))

    def close(self) -> None:
        self._mark_finished()
        if self.bar is not None:
            self.bar.close()

    def _mark_finished(self) -> None:
        if self.ranks.store is not None and not self.finished:
            self.finished = True
            self.ranks.store.add(self.finished_key, 1)


# ----------------------------------------------------------------------------------------- report


@dataclass
class DatasetReport:
    """What a run did: one record per item (the index lines), in item order, on every rank."""

    records: list[dict[str, Any]]
    index: Path
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.failures = [r for r in self.records if r["status"] == "failed"]

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    @property
    def ok(self) -> bool:
        return not self.failures


# -------------------------------------------------------------------------------------------- run


def encode_dataset(
    vae: nn.Module,
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    frames: str = "error",
    fallback: str = "error",
    size: tuple[int, int] | None = None,
    buckets: Sequence[tuple[int, int]] | None = None,
    fit: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    group=None,
    vae_name: str | None = None,
) -> DatasetReport:
    """Encode every image and video of ``sources`` into ``out_dir`` (one latent file per item plus
    ``index.jsonl``); see the module docstring. Call it on every rank of an initialised process
    group (``group``, default: the default group) to share the items out; without one, this
    process does everything. ``tile``/``budget``/``mode``/``frames``/``fallback`` go to
    :func:`quadtree_vae.encode`; ``size``/``buckets``/``fit`` say how frames are fitted; ``force``
    re-encodes verified items;
    ``progress``: None shows a bar on rank 0 when stderr is a terminal. A 2-D (SD-family) VAE
    encodes a video frame by frame (latent (T, C, h, w)). Bad options raise before any work; a bad
    item is recorded (``status: "failed"``) and the run goes on."""
    started = time.perf_counter()
    info = describe(vae)
    multiple = info["spatial_factor"] or 1
    size_, buckets_ = _check_sizes(size, buckets, fit, multiple)
    Options(tile, budget, mode, frames, fallback)  # checks them once, before any item is read
    _check_tiling(vae, bool(info["temporal_factor"]), tile, budget, mode, fallback)
    dtype = str(next(vae.parameters()).dtype).removeprefix("torch.")
    settings = _Settings(fingerprint(vae), dtype, mode, frames, size_, buckets_, fit)
    ranks = _Ranks(group)
    items, run_id = _share_items(ranks, sources)
    _same_weights(ranks, settings.fingerprint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {**info, "fingerprint": settings.fingerprint, "dtype": dtype,
            "vae": vae_name or getattr(vae, "_quadtree_vae_random", None) or info["class"]}
    job = _Job(vae, info, settings, out, tile, budget, fallback, force)
    bar = _Progress(ranks, run_id, len(items), progress)
    mine: list[dict[str, Any]] = []
    try:
        for i in range(ranks.rank, len(items), ranks.world):
            mine.append({"index": i, **job.run(items[i]), "rank": ranks.rank})
            bar.step()
        bar.wait_all()
    finally:
        bar.close()  # also marks this rank finished, so rank 0 never waits for a rank that failed
    records = sorted((r for part in ranks.all_gather(mine) for r in part), key=lambda r: r["index"])
    index = out / INDEX_NAME
    if ranks.rank == 0:
        _write_index(index, records)
    ranks.barrier()  # the index exists on return, on every rank
    return DatasetReport(records, index, time.perf_counter() - started)


def _check_tiling(vae: nn.Module, temporal: bool, tile, budget, mode: str, fallback: str) -> None:
    """Refuse a tile, budget or mode the model cannot take before any item is read (a plan for a
    nominal 64x64 input checks them; items whose own plan fails are recorded as they come)."""
    shape = (1, 3, 1, 64, 64) if temporal else (1, 3, 64, 64)
    try:
        api.plan(vae, shape, tile, budget, mode, op="encode")
    except UnsupportedArchitectureError:
        if fallback != "full":
            raise


def _share_items(ranks: _Ranks, sources) -> tuple[list[Item], str]:
    """Rank 0's item list and a fresh run id, on every rank (one listing, so every rank agrees on
    who does what even where the ranks see the files differently); a bad source raises everywhere."""
    found: tuple[list[Item] | None, str] = (None, "")
    if ranks.rank == 0:
        try:
            found = (collect_items(sources), uuid.uuid4().hex)
        except InvalidInputError as e:
            found = (None, str(e))
    items, run_id = ranks.broadcast(found)
    if items is None:
        raise InvalidInputError(run_id)
    return items, run_id


def _same_weights(ranks: _Ranks, fp: str) -> None:
    fps = ranks.all_gather(fp)
    if len(set(fps)) > 1:
        raise InvalidInputError(f"the ranks hold different VAE weights (fingerprints by rank: {', '.join(fps)}); "
                                "give every rank the same checkpoint and dtype")


def _write_index(path: Path, records: list[dict[str, Any]]) -> None:
    _remove_stale_temps(path)
    with media.atomic_path(path, force=True) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


@dataclass
class _Job:
    """Encoding one item end to end: verify or (re)encode, write, describe."""

    vae: nn.Module
    info: dict[str, Any]
    settings: _Settings
    out: Path
    tile: int | tuple[int, int] | None
    budget: int | str | None
    fallback: str
    force: bool

    def run(self, item: Item) -> dict[str, Any]:
        dest = self.out / item.name
        record: dict[str, Any] = {"source": item.key, "path": item.path, "latent": item.name}
        try:
            _remove_stale_temps(dest)
            meta = None if self.force else self.verified(item, dest)
            status = "verified"
            if meta is None:
                z, meta = self.encode(item)
                _write_latent(dest, z, meta)
                status = "written"
            return {**record, "status": status, **_summary(meta)}
        except Exception as e:  # one bad item must not stop the run: it is recorded instead
            msg = str(e) if isinstance(e, QuadtreeVAEError) else f"{type(e).__name__}: {e}"
            return {**record, "latent": None, "status": "failed", "error": msg}

    def verified(self, item: Item, dest: Path) -> dict[str, str] | None:
        """The metadata of ``dest`` if it holds this item's latent, intact, made the same way."""
        if not dest.is_file():
            return None
        try:
            z, meta, _ = media.load_latent(dest)
        except QuadtreeVAEError:
            return None
        same = (meta.get("dataset_settings") == self.settings.as_json()
                and meta.get("source") == item.key
                and media.meta_value(meta, "source_bytes") == _file_size(item.path)
                and meta.get("latent_sha256") == _digest(z))
        return meta if same else None

    def encode(self, item: Item) -> tuple[torch.Tensor, dict[str, Any]]:
        src = media.read_media(item.path)
        frames, geometry = self.fit(src.frames)
        x = media.to_tensor(frames)  # (T, 3, H, W)
        temporal = bool(self.info["temporal_factor"])
        kw = {"frames": self.settings.frames, "fallback": self.fallback, "output_device": "cpu"}
        if temporal:
            z = api.encode(self.vae, x.permute(1, 0, 2, 3).unsqueeze(0), self.tile, self.budget,
                           self.settings.mode, **kw)
            encoded = (z.shape[2] - 1) * self.info["temporal_factor"] + 1
        else:  # a 2-D VAE takes a video as a batch of images, one at a time to bound memory
            z = torch.cat([api.encode(self.vae, x[k:k + 1], self.tile, self.budget, self.settings.mode, **kw)
                           for k in range(x.shape[0])])
            encoded = x.shape[0]
        meta = self.metadata(item, src, z, geometry, encoded)
        return z, meta

    def fit(self, frames: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Frames resized/cropped as the settings ask, and what was done (for the metadata)."""
        s = self.settings
        target = s.size or (nearest_bucket(*frames.shape[1:3], s.buckets) if s.buckets else None)
        if target is None:
            return _fit_multiple(frames, s.fit, self.info["spatial_factor"] or 1)
        fitted, scaled, offset = _cover_crop(frames, target)
        geometry: dict[str, Any] = {"resized_to": scaled, "crop_offset": offset}
        if s.buckets:
            geometry["bucket"] = list(target)
        return fitted, geometry

    def metadata(self, item: Item, src: media.Media, z: torch.Tensor, geometry: dict[str, Any],
                 encoded: int) -> dict[str, Any]:
        from . import __version__

        info, t = self.info, src.count
        h, w = (z.shape[-2] * (info["spatial_factor"] or 1), z.shape[-1] * (info["spatial_factor"] or 1))
        return {
            "version": DATASET_VERSION,
            "quadtree_vae_version": __version__,
            "architecture": info["arch"],
            "vae_class": info["class"],
            "vae": info["vae"],
            "fingerprint": info["fingerprint"],
            "vae_dtype": info["dtype"],
            "random_weights": bool(info["random"]),
            "note": "random weights: output is not a real image" if info["random"] else None,
            "shape": list(z.shape),
            "dtype": str(z.dtype).removeprefix("torch."),
            "latent_channels": int(z.shape[1]),
            "scaled": False,
            "mode": self.settings.mode,
            "source": item.key,
            "source_path": item.path,
            "source_bytes": _file_size(item.path),
            "kind": "video" if src.is_video else "image",
            "source_size": list(src.size),
            "image_size": [h, w],
            **geometry,
            "frames": t,
            "frames_encoded": encoded,
            "frames_padded": max(0, encoded - t) or None,
            "frames_trimmed": max(0, t - encoded) or None,
            "frames_as_batch": True if src.is_video and not info["temporal_factor"] else None,
            "fps": str(src.fps) if src.fps is not None else None,
            "dataset_settings": self.settings.as_json(),
        }


def _write_latent(dest: Path, z: torch.Tensor, meta: dict[str, Any]) -> None:
    media.save_latent(dest, z, {**meta, "latent_sha256": _digest(z)}, force=True)


def _digest(z: torch.Tensor) -> str:
    return hashlib.sha256(z.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _remove_stale_temps(dest: Path) -> None:
    """Delete temporary files a killed run left for ``dest`` (only the rank that writes ``dest`` calls this)."""
    for tmp in dest.parent.glob(f".{glob.escape(dest.stem)}.*.tmp{dest.suffix}"):
        tmp.unlink(missing_ok=True)


_SUMMARY_KEYS = ("shape", "kind", "source_size", "image_size", "bucket", "frames", "frames_encoded", "fps")


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The index fields of an item, from its metadata (as written, or as read back: JSON strings)."""
    out = {}
    for k in _SUMMARY_KEYS:
        v = meta.get(k)
        v = media.meta_value(meta, k) if isinstance(v, str) and k != "fps" else v
        if v is not None:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------- command


def add_parser(sub, parents: Sequence) -> None:
    """Register ``qvae cache`` on the ``qvae`` subparsers (``parents``: the shared flag groups)."""
    from .cli import _parse_size

    def parse_buckets(value: str) -> list[tuple[int, int]]:
        return [_parse_size(v) for v in value.split(",") if v.strip()]

    p = sub.add_parser(
        "cache", parents=list(parents), help="a folder/glob/manifest of images and videos -> latent files + index",
        description="Encode every image and video of the sources into OUT/<name>-<digest>.safetensors "
                    f"(key 'latent', with metadata) and OUT/{INDEX_NAME}. Resumable: verified files are skipped. "
                    "A bad item is recorded in the index and the run goes on; the exit status is 1 if any "
                    "item failed. Under torchrun the items are shared out over the ranks (one shared OUT "
                    "folder on several machines).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folder (searched recursively), glob pattern (quote it), manifest (.txt: one path a "
                        "line; .jsonl: objects with \"path\") or file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--size", type=_parse_size, default=None, metavar="HxW",
                   help="scale every item to cover HxW and crop the centre")
    p.add_argument("--buckets", type=parse_buckets, default=None, metavar="HxW,HxW,...",
                   help="as --size, to the bucket nearest in aspect ratio")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args, out) -> int:
    """Run ``qvae cache``: join the torchrun process group if there is one, load the VAE on this
    rank's device, encode, and report on rank 0. Returns 1 if any item failed."""
    import torch.distributed as dist

    from .options import parse_bytes

    parse_bytes(args.budget)
    _check_sizes(args.size, args.buckets, args.fit, 1)  # multiples of the model's factor: checked once it is loaded
    own_group = _init_distributed(args.device)
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        items, _ = _share_items(_Ranks(), args.sources)  # a bad source is refused before the model loads
        device = _rank_device(args.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            vae = parse_vae_spec(args.vae, device=device, dtype=args.dtype, arch=args.arch)
        report = encode_dataset(
            vae, items, args.output, tile=args.tile, budget=args.budget, mode=args.mode,
            frames=args.frames or "error", fallback=args.fallback, size=args.size, buckets=args.buckets,
            fit=args.fit, force=args.force, progress=False if args.quiet else None,
            vae_name=args.vae if args.vae.startswith("random") else Path(args.vae).name)
        if rank == 0:
            _say(report, out)
        return 0 if report.ok else 1
    finally:
        if own_group:
            dist.destroy_process_group()


def _init_distributed(device: str | None) -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); True if this
    call made it. NCCL for CUDA, gloo otherwise."""
    import torch.distributed as dist

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _rank_device(device: str | None) -> str:
    """``cuda:LOCAL_RANK`` for a bare ``cuda`` (or no choice, with CUDA present); else as given."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return device or "cpu"


def _say(report: DatasetReport, out) -> None:
    n = len(report.records)
    for r in report.failures:
        out.warn(f"{r['source']}: {r['error']}")
    rate = n / report.seconds if report.seconds > 0 else float("inf")
    out.result(f"{n} items: {report.count('written')} written, {report.count('verified')} verified (skipped), "
               f"{len(report.failures)} failed; index {report.index} [{report.seconds:.1f} s, {rate:.2f} items/s]")

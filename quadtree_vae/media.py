"""Reading images, videos and latent files, and writing them atomically.

Pixels travel as ``uint8`` arrays of shape (T, H, W, 3) (an image is one frame), or ``uint16``
for a 16-bit greyscale image read with ``deep=True``; the model side works on float tensors in
[-1, 1], scaled by the array's own range. Images go through Pillow, videos through PyAV (FFmpeg), latents
through safetensors with string metadata.

Every write goes to a temporary file in the destination's folder and is moved into place with
``os.replace`` only once complete, so a failure never leaves a partial file behind; an existing
destination is kept unless ``force`` is given, and :func:`check_output` tells so before any
heavy work. Problems with the files themselves raise :class:`~quadtree_vae.errors.InvalidInputError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInputError

IMAGE_READ = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_READ = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_WRITE = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_WRITE = (".mp4", ".webm", ".gif")
LATENT_EXT = ".safetensors"
LATENT_KEY = "latent"
LATENT_FORMAT = "quadtree-vae-latent"
PIXELS_KEY = "pixels"  # a float pixel tensor in a .safetensors file: exact input to encode, exact output of decode
PIXELS_FORMAT = "quadtree-vae-pixels"
DEFAULT_FPS = Fraction(16)  # for a video file that states no frame rate (the command line passes the model's)

# (codec, pixel format, options) per container written
_VIDEO_CODECS = {
    ".mp4": ("libx264", "yuv420p", {"crf": "16", "preset": "medium"}),
    ".webm": ("libvpx-vp9", "yuv420p", {"crf": "24", "b:v": "0"}),
    ".gif": ("gif", "pal8", {}),
}


@dataclass
class Media:
    """Decoded pixels: ``frames`` (T, H, W, 3) uint8; ``fps`` is None for a still image."""

    frames: np.ndarray
    fps: Fraction | None
    is_video: bool

    @property
    def count(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])


# ------------------------------------------------------------------------------------------- kinds


def kind_of(path: str | os.PathLike[str]) -> str:
    """"image", "video" or "latent", from the file name's extension."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_READ:
        return "image"
    if ext in VIDEO_READ:
        return "video"
    if ext == LATENT_EXT:
        return "latent"
    raise InvalidInputError(
        f"{path}: unknown file type {ext or '(no extension)'!r}; images: {', '.join(IMAGE_READ)}; "
        f"videos: {', '.join(VIDEO_READ)}; latents: {LATENT_EXT}"
    )


def check_output(path: str | os.PathLike[str], force: bool, allowed: tuple[str, ...],
                 inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Validate an output path before any heavy work: known extension, existing folder, a file
    other than any of ``inputs`` (whatever ``force`` says), and no existing file unless ``force``.
    Returns the path."""
    p = Path(path)
    for source in inputs:
        if same_file(p, source):
            raise InvalidInputError(f"{p} is the input file {source}; write the output to another path "
                                    "(--force never overwrites an input)")
    ext = p.suffix.lower()
    if ext not in allowed:
        raise InvalidInputError(
            f"{p}: cannot write {ext or 'a file without extension'!r} here; use one of {', '.join(allowed)}"
        )
    if p.is_dir():
        raise InvalidInputError(f"{p} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"{p}: the folder {parent} does not exist")
    if p.exists() and not force:
        raise InvalidInputError(f"{p} already exists; pass --force to overwrite it")
    try:  # the write goes through a temporary file in the same folder: try one now, not after the work
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise InvalidInputError(f"{p}: cannot write in the folder {parent} ({e.strerror or e})") from e
    return p


def check_frame_size(path: str | os.PathLike[str], height: int, width: int) -> None:
    """Refuse a frame size the output's codec cannot take (.mp4 and .webm: yuv420p, even sides)."""
    ext = Path(path).suffix.lower()
    if ext in _VIDEO_CODECS and _VIDEO_CODECS[ext][1] == "yuv420p" and (height % 2 or width % 2):
        raise InvalidInputError(f"{Path(path).name}: {ext} needs an even height and width, the output would be "
                                f"{height}x{width}; write a .gif or a .png, or crop with --fit crop")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: the same real path (symlinks resolved) or, for files that
    exist, the same inode (hard links)."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return False


def check_input(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file")
    if p.is_dir():
        raise InvalidInputError(f"{p} is a directory, not a file")
    return p


# --------------------------------------------------------------------------------------- atomicity


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same extension, so writers pick the same format);
    on success move it onto ``path``, on any failure delete it. Without ``force`` an existing
    ``path`` (also one that appeared meanwhile) is never replaced."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}", dir=parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {p}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not force and p.exists():
            raise InvalidInputError(f"{p} already exists; pass --force to overwrite it")
        mode = _umask_mode()
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, p)
    except OSError as e:  # disk full, ...: name the user's file, not the temporary one
        with contextlib.suppress(OSError):
            tmp.unlink()
        if str(tmp) not in str(e):
            raise
        raise OSError(e.errno, f"cannot write {p}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# ------------------------------------------------------------------------------------------ pixels


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 or uint16 -> (T, 3, H, W) float32 in [-1, 1] (0 -> -1, the type's max -> 1)."""
    arr = np.ascontiguousarray(frames)
    if arr.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"pixels must be uint8 or uint16, not {arr.dtype}")
    half = np.iinfo(arr.dtype).max / 2
    if arr.dtype == np.uint16:
        arr = arr.astype(np.float32)
    elif not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / half - 1.0


def to_8bit(frames: np.ndarray) -> np.ndarray:
    """uint16 pixels rounded to uint8 (65535 -> 255); uint8 pixels as they are."""
    if frames.dtype == np.uint8:
        return frames
    return np.round(frames.astype(np.float64) / 257.0).astype(np.uint8)


def from_tensor(x: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) float in [-1, 1] -> (T, H, W, 3) uint8 (values outside are clipped)."""
    y = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


# ------------------------------------------------------------------------------------------ reading


def read_media(path: str | os.PathLike[str], deep: bool = False) -> Media:
    """Read an image (one frame) or a whole video into memory (``deep``: see :func:`read_image`)."""
    p = check_input(path)
    kind = kind_of(p)
    if kind == "image":
        return Media(read_image(p, deep)[None], None, False)
    if kind == "video":
        frames, fps = read_video(p)
        return Media(frames, fps, True)
    raise InvalidInputError(f"{p}: expected an image or a video, got a latent file")


_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit greyscale modes (16-bit PNG, TIFF, PGM)


def read_image(path: str | os.PathLike[str], deep: bool = False) -> np.ndarray:
    """(H, W, 3) uint8, with EXIF orientation applied; alpha is dropped, greyscale expanded.

    A 16-bit greyscale image is scaled from its own range (65535 is white): as uint16 with ``deep``
    (so the model gets all 16 bits), else rounded to uint8. Pillow's ``convert("RGB")`` would clip it
    to 255 instead. 32-bit integer and float images (modes I, F) have no known white and are refused.
    Pillow reads a 16-bit-per-channel RGB PNG at 8 bits per channel (correctly scaled).

    Pillow's decompression-bomb limit holds: an image of more than twice ``Image.MAX_IMAGE_PIXELS``
    (2 x 89,478,485 pixels by default, about 13,000 x 13,000) is refused before it is decoded, and
    one above the limit itself reads with Pillow's warning. Larger images need a raised limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "F"):
                raise InvalidInputError(f"{path}: a 32-bit {'float' if im.mode == 'F' else 'integer'} image "
                                        f"(mode {im.mode}) has no defined white level; save it as 8- or 16-bit")
            if im.mode in _16BIT:
                grey = np.asarray(im).astype(np.uint16)
                frame = np.repeat(grey[..., None], 3, axis=2)
                return frame if deep else to_8bit(frame)
            return np.asarray(im.convert("RGB")).copy()
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"{path}: refused: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"{path}: cannot read the image ({e})") from e


def read_video(path: str | os.PathLike[str]) -> tuple[np.ndarray, Fraction]:
    """All frames of the first video stream as (T, H, W, 3) uint8, and the frame rate."""
    _, _, fps = probe_video(path)
    return np.concatenate(list(video_chunks(path))), fps


def video_chunks(path: str | os.PathLike[str], frames_per_chunk: int = 1) -> Iterator[np.ndarray]:
    """The frames of the first video stream, decoded lazily: (t, H, W, 3) uint8 chunks of
    ``frames_per_chunk`` frames (the last may be shorter), so a clip need never be whole in memory."""
    with _video(path) as (container, stream):
        held: list[np.ndarray] = []
        for frame in container.decode(stream):
            held.append(frame.to_ndarray(format="rgb24"))
            if len(held) == frames_per_chunk:
                yield np.stack(held)
                held = []
        if held:
            yield np.stack(held)


def probe(path: str | os.PathLike[str]) -> tuple[tuple[int, int], int, np.ndarray]:
    """((H, W), frame count, first frame) of an image or video, without decoding a whole video."""
    if kind_of(path) == "image":
        frame = read_image(path)
        return frame.shape[:2], 1, frame
    first, count, _ = _probe_video(path)
    return first.shape[:2], count, first


def probe_video(path: str | os.PathLike[str]) -> tuple[tuple[int, int], int, Fraction]:
    """((H, W), frame count, frame rate) of a video, decoding only its first frame."""
    first, count, fps = _probe_video(path)
    return first.shape[:2], count, fps


def _probe_video(path: str | os.PathLike[str]) -> tuple[np.ndarray, int, Fraction]:
    """(first frame, frame count, frame rate): the count from the container, else from its packets."""
    with _video(path) as (container, stream):
        first = next((f.to_ndarray(format="rgb24") for f in container.decode(stream)), None)
        if first is None:
            raise InvalidInputError(f"{path}: the video has no frames")
        count = stream.frames
        if not count:
            container.seek(0)
            count = sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = Fraction(rate).limit_denominator(1001 * 1000) if rate else DEFAULT_FPS
    return first, int(count), fps


@contextlib.contextmanager
def _video(path: str | os.PathLike[str]) -> Iterator[tuple]:
    """The open container and its first video stream; FFmpeg's errors become InvalidInputError."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidInputError(f"{path}: the file has no video stream")
            yield container, container.streams.video[0]
    except av.FFmpegError as e:
        raise InvalidInputError(f"{path}: cannot read the video ({e})") from e


# ------------------------------------------------------------------------------------------ writing


def write_media(path: str | os.PathLike[str], frames: np.ndarray, fps: Fraction | None, force: bool = False) -> None:
    """Write (T, H, W, 3) uint8 frames atomically: an image extension takes exactly one frame,
    a video extension any number (at ``fps``, default 16)."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in IMAGE_WRITE:
        if frames.shape[0] != 1:
            raise InvalidInputError(f"{p}: {frames.shape[0]} frames cannot go into an image; use {VIDEO_WRITE}")
        with atomic_path(p, force) as tmp:
            _write_image(tmp, frames[0])
    elif ext in VIDEO_WRITE:
        with video_writer(p, fps, force) as write:
            write(frames)
    else:
        raise InvalidInputError(f"{p}: cannot write {ext!r}; use one of {', '.join(IMAGE_WRITE + VIDEO_WRITE)}")


@contextlib.contextmanager
def video_writer(path: str | os.PathLike[str], fps: Fraction | None,
                 force: bool = False) -> Iterator[Callable[[np.ndarray], None]]:
    """``with video_writer(path, fps) as write: write(frames)``: (t, H, W, 3) uint8 frames go into
    the video as they come (the encoder is opened once, at the first frame, which sets the size).
    The file appears at ``path`` only when the block ends without error; an error or a Ctrl-C
    leaves neither it nor a temporary file."""
    p = Path(path)
    if p.suffix.lower() not in VIDEO_WRITE:
        raise InvalidInputError(f"{p}: cannot write a video as {p.suffix.lower()!r}; use one of "
                                f"{', '.join(VIDEO_WRITE)}")
    with atomic_path(p, force) as tmp, contextlib.closing(_VideoEncoder(tmp, fps or DEFAULT_FPS)) as encoder:
        yield encoder.write
        encoder.finish()


def _write_image(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    ext = path.suffix.lower()
    if ext in (".jpg", ".jpeg"):
        im.save(path, format="JPEG", quality=95)
    elif ext == ".webp":
        im.save(path, format="WEBP", lossless=True)
    else:
        im.save(path, format="PNG")


class _VideoEncoder:
    """One output video through FFmpeg: frames are encoded and muxed as they are written."""

    def __init__(self, path: Path, fps: Fraction):
        self.path, self.rate = path, Fraction(fps).limit_denominator(1001 * 1000)
        self.container = self.stream = None
        self.palette = _VIDEO_CODECS[path.suffix.lower()][1] == "pal8"

    def _open(self, h: int, w: int) -> None:
        import av

        ext = self.path.suffix.lower()
        codec, pix_fmt, options = _VIDEO_CODECS[ext]
        check_frame_size(self.path, h, w)
        fmt = "mp4" if ext == ".mp4" else ("webm" if ext == ".webm" else "gif")
        self.container = av.open(str(self.path), "w", format=fmt)
        self.stream = self.container.add_stream(codec, rate=self.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, pix_fmt
        if options:
            self.stream.options = dict(options)

    def write(self, frames: np.ndarray) -> None:
        """Encode (t, H, W, 3) uint8 frames, all of the first frames' size."""
        import av

        if self.container is None:
            self._open(*frames.shape[1:3])
        elif (frames.shape[1], frames.shape[2]) != (self.stream.height, self.stream.width):
            raise InvalidInputError(f"{self.path}: a {frames.shape[1]}x{frames.shape[2]} frame in a "
                                    f"{self.stream.height}x{self.stream.width} video")
        for frame in frames:
            vf = _gif_frame(frame) if self.palette else av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame), format="rgb24")
            self._mux(self.stream.encode(vf))

    def finish(self) -> None:
        """Flush the encoder's delayed frames; a video needs at least one frame."""
        if self.container is None:
            raise InvalidInputError(f"{self.path}: no frames to write")
        self._mux(self.stream.encode())

    def _mux(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()


def _gif_frame(frame: np.ndarray):
    """A palette frame (256 colours chosen for this frame) for FFmpeg's GIF encoder."""
    import av
    from PIL import Image

    pal_im = Image.fromarray(np.ascontiguousarray(frame), "RGB").quantize(
        256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    index = np.asarray(pal_im, dtype=np.uint8)
    rgb = np.array(pal_im.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    argb = np.zeros((256, 4), dtype=np.uint8)
    argb[:, 0] = 255
    argb[: len(rgb), 1:] = rgb
    return av.VideoFrame.from_ndarray((np.ascontiguousarray(index), argb), format="pal8")


# ------------------------------------------------------------------------------------------ latents


def save_latent(path: str | os.PathLike[str], z: torch.Tensor, metadata: Mapping[str, object],
                force: bool = False) -> None:
    """Write ``z`` under the key "latent" with string metadata (non-strings are JSON-encoded)."""
    from safetensors.torch import save_file

    meta = {"format": LATENT_FORMAT}
    for k, v in metadata.items():
        if v is None:
            continue
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    with atomic_path(path, force) as tmp:
        save_file({LATENT_KEY: z.detach().cpu().contiguous()}, str(tmp), metadata=meta)


def load_latent(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, str], list[str]]:
    """(latent, metadata, notes). A file without a "latent" key but with exactly one tensor is
    accepted (a note says so); anything else is refused with the keys found."""
    from safetensors import SafetensorError, safe_open

    p = check_input(path)
    notes: list[str] = []
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            if LATENT_KEY in keys:
                key = LATENT_KEY
            elif len(keys) == 1:
                key = keys[0]
                notes.append(f"{p.name}: no {LATENT_KEY!r} tensor; using the only tensor, {key!r}")
            else:
                raise InvalidInputError(
                    f"{p}: no {LATENT_KEY!r} tensor (found {', '.join(keys[:8]) or 'none'}); "
                    f"is this a latent file written by `qvae encode`?"
                )
            z = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"{p}: cannot read the latent file ({e})") from e
    if not z.is_floating_point():
        raise InvalidInputError(f"{p}: the latent tensor has dtype {z.dtype}; expected floating point")
    _check_meta(meta, p)
    return z, meta, notes


def holds_pixels(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a .safetensors file with a "pixels" tensor (not a latent file)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.suffix.lower() != LATENT_EXT or not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = f.keys()
        return PIXELS_KEY in keys
    except (SafetensorError, OSError, ValueError):
        return False  # load_latent reports what is wrong with the file


def load_pixels(path: str | os.PathLike[str]) -> torch.Tensor:
    """The "pixels" tensor of a .safetensors file: float (B, C, H, W) or (B, C, T, H, W) in [-1, 1],
    the model's own input convention, taken with all its bits (no 8-bit rounding, no resizing)."""
    from safetensors import SafetensorError, safe_open

    p = check_input(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            x = f.get_tensor(PIXELS_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInputError(f"{p}: cannot read the pixel tensor ({e})") from e
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"{p}: the {PIXELS_KEY!r} tensor must hold finite floats, got {x.dtype}")
    return x


def save_pixels(path: str | os.PathLike[str], y: torch.Tensor, metadata: Mapping[str, object],
                force: bool = False) -> None:
    """Write decoded pixels (float, [-1, 1]) under the key "pixels", as :func:`load_pixels` reads them."""
    from safetensors.torch import save_file

    meta = {"format": PIXELS_FORMAT, **{str(k): v if isinstance(v, str) else json.dumps(v)
                                         for k, v in metadata.items() if v is not None}}
    with atomic_path(path, force) as tmp:
        save_file({PIXELS_KEY: y.detach().cpu().contiguous()}, str(tmp), metadata=meta)


def _check_meta(meta: Mapping[str, str], path: Path) -> None:
    """Refuse metadata that decode would act on but cannot read (before the model runs)."""
    padded = meta_value(meta, "frames_padded", 0)
    if padded is not None and not _count(padded, 0):
        raise InvalidInputError(f"{path}: malformed metadata frames_padded={meta['frames_padded']!r}: "
                                f"expected a number of frames")
    size = meta_value(meta, "source_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(_count(s, 1) for s in size)):
        raise InvalidInputError(f"{path}: malformed metadata source_size={meta['source_size']!r}: "
                                f"expected [height, width]")
    if meta_value(meta, "fit") not in (None, "crop", "pad"):
        raise InvalidInputError(f"{path}: malformed metadata fit={meta['fit']!r}: expected crop or pad")


def _count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def meta_value(meta: Mapping[str, str], key: str, default=None):
    """A metadata entry decoded from JSON (plain strings returned as they are)."""
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError):
        return meta[key]


def fps_from_meta(value) -> Fraction | None:
    if value in (None, "", "null"):
        return None
    try:
        fps = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return fps if fps > 0 else None

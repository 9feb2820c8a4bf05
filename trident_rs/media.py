"""Write generated frames: PNG for images, MP4 (imageio-ffmpeg) or GIF for videos; or bytes."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from trident_rs.errors import InvalidRequestError

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png",)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidRequestError("frames", f"need uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def png_bytes(frame: np.ndarray) -> bytes:
    """PNG of one frame (H, W, 3) or the first of (F, H, W, 3)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_check_frames(frame)[0]).save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for f in _check_frames(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int = 8) -> bytes:
    """H.264 MP4 through imageio-ffmpeg's bundled ffmpeg, at the frames' exact size."""
    import imageio.v2 as imageio

    frames = _check_frames(frames)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        odd = frames.shape[1] % 2 or frames.shape[2] % 2  # yuv420p needs even sizes
        with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                                pixelformat="yuv444p" if odd else "yuv420p") as writer:
            for frame in frames:
                writer.append_data(frame)
        return Path(path).read_bytes()


def video_bytes(frames: np.ndarray, fps: int = 8) -> tuple[bytes, str]:
    """(bytes, mime type): MP4 when ffmpeg is available, else GIF."""
    try:
        return mp4_bytes(frames, fps), "video/mp4"
    except (ImportError, RuntimeError, OSError):
        return gif_bytes(frames, fps), "image/gif"


def encode_media(frames: np.ndarray, fps: int = 8) -> tuple[bytes, str]:
    """(bytes, mime type) for one result: PNG for a single frame, a video otherwise."""
    frames = _check_frames(frames)
    return (png_bytes(frames), "image/png") if len(frames) == 1 else video_bytes(frames, fps)


def write_media(frames: np.ndarray, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames to `path` by its suffix (.png, .mp4, .gif); returns the path written.

    An .mp4 that ffmpeg cannot write falls back to a .gif next to it.
    """
    path = Path(path)
    frames = _check_frames(frames)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise InvalidRequestError("out", f"unsupported file type {suffix!r}; use .png, .mp4 or .gif")
    if suffix == ".png" and len(frames) > 1:
        raise InvalidRequestError("out", f"{len(frames)} frames cannot go in a PNG; use .mp4 or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        data = png_bytes(frames)
    elif suffix == ".gif":
        data = gif_bytes(frames, fps)
    else:
        data, mime = video_bytes(frames, fps)
        if mime == "image/gif":
            path = path.with_suffix(".gif")
    path.write_bytes(data)
    return path

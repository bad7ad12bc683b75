"""Write rollout frames to a video file with PyAV: h264/yuv420p/crf 22 mp4 as the original's recorder, or gif."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from diffusion_policy.errors import UserError


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int = 10) -> Path:
    """Encode HxWx3 uint8 RGB frames to `path` (.mp4/.mkv/.mov: h264; .gif: palette gif) and return the path.

    Frames are streamed, so a long rollout is never held in memory. h264 with yuv420p needs even sides, so odd
    sizes are padded by one edge pixel (the 96 px Push-T frames need none). Raises UserError for an unknown
    extension or bad frames, and when no frame was given.
    """
    import av

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".mp4", ".mkv", ".mov", ".gif"):
        raise UserError(f"unsupported video extension {ext!r} for {path}; use .mp4 or .gif")
    if int(fps) != fps or fps <= 0:
        raise UserError(f"fps must be a positive integer, got {fps!r}")
    path.parent.mkdir(parents=True, exist_ok=True)

    container = None
    stream = None
    try:
        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise UserError(
                    f"video frames must be HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}"
                )
            if container is None:
                first_shape = frame.shape[:2]
                height, width = first_shape
                pad = (0, 0)
                container = av.open(str(path), mode="w")
                if ext == ".gif":
                    stream = container.add_stream("gif", rate=int(fps))
                    stream.pix_fmt = "rgb8"
                else:
                    stream = container.add_stream("h264", rate=int(fps))
                    stream.pix_fmt = "yuv420p"
                    stream.options = {"crf": "22", "profile": "high"}
                    pad = (height % 2, width % 2)
                stream.height, stream.width = height + pad[0], width + pad[1]
            if frame.shape[:2] != first_shape:
                raise UserError(
                    f"all video frames must have the same size; got {frame.shape[:2]} after {first_shape}"
                )
            if pad != (0, 0):
                frame = np.pad(frame, ((0, pad[0]), (0, pad[1]), (0, 0)), mode="edge")
            av_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(av_frame):
                container.mux(packet)
        if container is None:
            raise UserError(f"no frames to write to {path}")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        if container is not None:
            container.close()
    return path

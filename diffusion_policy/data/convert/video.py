"""Video files frame by frame with PyAV: decode in order and hand frames out by timestamp, or encode.

Datasets such as LeRobot's keep several episodes back to back in one mp4 and locate an episode by
its start time, so a reader asks for frames at given timestamps, not by index. Decoding is strictly
sequential (one decoded frame held at a time), so a long file never has to fit in memory. Every
failure (no such file, no video stream, a codec FFmpeg cannot decode, a frame missing at a requested
timestamp, a frame of the wrong size) is one `DataError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from diffusion_policy.errors import DataError

# Encoder settings of LeRobot's writer (video_utils.encode_video_frames): a key frame every 2
# frames keeps random access cheap for its loader; crf 30; SVT-AV1's fastest preset.
CODEC_OPTIONS = {
    "libsvtav1": {"g": "2", "crf": "30", "preset": "12"},
    "h264": {"g": "2", "crf": "23"},
}
CODEC_NAMES = {"libsvtav1": "av1", "h264": "h264"}  # encoder -> the codec name info.json records


def _av():
    import av

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr otherwise
    av.logging.set_level(av.logging.ERROR)
    return av


class FrameCursor:
    """One video file's frames in decode order; `take(timestamps)` returns the frames at those times.

    Each requested time must have a frame within `tolerance_s` (frames between requests are skipped).
    A request earlier than what was already consumed reopens the file from the start.
    """

    def __init__(self, path: str | os.PathLike, tolerance_s: float, shape: tuple[int, ...]):
        self.path = Path(path)
        self.tolerance_s = tolerance_s
        self.shape = tuple(shape)
        self._container = None
        self._open()

    def _open(self) -> None:
        av = _av()
        self.close()
        if not self.path.is_file():
            raise DataError(f"{self.path}: video file missing")
        try:
            self._container = av.open(str(self.path))
        except av.error.FFmpegError as e:
            raise DataError(f"{self.path}: not a readable video file ({e})") from e
        streams = self._container.streams.video
        if not streams:
            raise DataError(f"{self.path}: no video stream in the file")
        stream = streams[0]
        if stream.codec_context is None:
            tag = getattr(stream, "codec_tag", "") or "?"
            raise DataError(
                f"{self.path}: unknown video codec (tag {tag!r}): this FFmpeg has no decoder for it"
            )
        self.codec = stream.codec_context.name
        self._frames: Iterator = self._container.decode(stream)
        self._next = None  # (time, frame) decoded but not consumed
        self._last_time = float("-inf")  # time of the last frame consumed or skipped

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _peek(self):
        if self._next is None:
            av = _av()
            try:
                frame = next(self._frames, None)
            except av.error.FFmpegError as e:
                raise DataError(
                    f"{self.path}: cannot decode {self.codec} video after t={self._last_time:.4f} s ({e})"
                ) from e
            if frame is None:
                return None
            if frame.time is None:
                raise DataError(f"{self.path}: a frame has no timestamp (pts)")
            self._next = (float(frame.time), frame)
        return self._next

    def take(self, timestamps: np.ndarray, what: str) -> np.ndarray:
        """Frames (N, H, W, 3) uint8 at `timestamps` (seconds, increasing); `what` names them in errors."""
        tol = self.tolerance_s
        if len(timestamps) and timestamps[0] < self._last_time - tol:
            self._open()  # asked for an earlier part of the file: decode again from the start
        out = np.empty((len(timestamps), *self.shape), dtype=np.uint8)
        for j, t in enumerate(np.asarray(timestamps, dtype=np.float64)):
            while True:
                nxt = self._peek()
                if nxt is None or nxt[0] > t + tol:
                    after = (
                        "the video ends" if nxt is None else f"the next frame is at {nxt[0]:.4f} s"
                    )
                    raise DataError(
                        f"{self.path}: {what}: no video frame within tolerance_s={tol:g} of "
                        f"t={t:.4f} s (frame {j}; the last before is at {self._last_time:.4f} s, "
                        f"{after}): frames are missing"
                    )
                ft, frame = nxt
                self._next, self._last_time = None, ft
                if ft >= t - tol:
                    out[j] = self._image(frame, what)
                    break
        return out

    def _image(self, frame, what: str) -> np.ndarray:
        img = frame.to_ndarray(format="rgb24")
        if img.shape != self.shape:
            raise DataError(
                f"{self.path}: {what}: frames are {img.shape} (H, W, C), the dataset declares {self.shape}"
            )
        return img


class VideoWriter:
    """Frames appended to one mp4 at a fixed rate; `n_frames` gives where the next frame starts."""

    def __init__(
        self, path: str | os.PathLike, fps: int, height: int, width: int, vcodec: str = "libsvtav1"
    ):
        av = _av()
        if vcodec not in CODEC_OPTIONS:
            raise DataError(f"unknown video codec {vcodec!r} (choose from {sorted(CODEC_OPTIONS)})")
        if height % 2 or width % 2:
            raise DataError(f"{path}: yuv420p video needs even frame sizes, got {height}x{width}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        self._stream = self._container.add_stream(
            vcodec, rate=Fraction(fps), options=dict(CODEC_OPTIONS[vcodec])
        )
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(1, fps)
        self.n_frames = 0
        self.bytes_written = 0

    def write(self, frames: np.ndarray) -> None:
        av = _av()
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.n_frames
            self.n_frames += 1
            self._mux(self._stream.encode(frame))

    def _mux(self, packets) -> None:
        for p in packets:
            self.bytes_written += p.size
            self._container.mux(p)

    def close(self) -> None:
        self._mux(self._stream.encode(None))
        self._container.close()

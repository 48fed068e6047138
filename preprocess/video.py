"""Video probing, clip fan-out and frame-exact clip decoding.

A video is probed (frame count, fps, size) without decoding, then fanned out into clip specs, so one
long video becomes many small decode tasks. A clip decodes only its frames (decord's random access;
PyAV as a fallback for containers decord cannot open), resized on the fly to the target size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


@dataclass
class VideoPolicy:
    frames_per_clip: int = 16  # multiple of the temporal patch (4)
    frame_stride: int = 2  # used when target_fps is None
    target_fps: float | None = None
    max_clips_per_video: int = 4
    min_frames: int = 4
    max_side: int = 256
    min_side: int = 32
    multiple: int = 16
    max_pixels_per_frame: int = 8_294_400  # 4K

    def validate(self) -> "VideoPolicy":
        if self.frames_per_clip < 4 or self.frames_per_clip % 4:
            raise ValueError(f"video.frames_per_clip={self.frames_per_clip} must be a positive multiple of 4")
        if self.frame_stride < 1:
            raise ValueError(f"video.frame_stride={self.frame_stride} must be >= 1")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError(f"video.target_fps={self.target_fps} must be > 0")
        if self.max_clips_per_video < 1:
            raise ValueError(f"video.max_clips_per_video={self.max_clips_per_video} must be >= 1")
        if self.min_frames < 4 or self.min_frames % 4:
            raise ValueError(f"video.min_frames={self.min_frames} must be a multiple of 4, >= 4")
        return self


@dataclass
class VideoMeta:
    frames: int
    fps: float
    height: int
    width: int
    backend: str


def probe(path: str) -> VideoMeta:
    """Container metadata without decoding frames; decord first, PyAV as fallback."""
    errors = []
    try:
        import decord

        vr = decord.VideoReader(path, num_threads=1)
        h, w = vr[0].shape[:2] if len(vr) else (0, 0)
        meta = VideoMeta(len(vr), float(vr.get_avg_fps()), int(h), int(w), "decord")
        del vr
        if meta.frames > 0:
            return meta
        errors.append("decord: no frames")
    except Exception as e:  # decord raises its own DECORDError types
        errors.append(f"decord: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    try:
        import av

        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0) or 25.0
            frames = s.frames or int(float(s.duration * s.time_base) * fps if s.duration else 0)
            if frames <= 0:
                frames = sum(1 for _ in c.demux(s))
            return VideoMeta(int(frames), fps, int(s.codec_context.height), int(s.codec_context.width), "av")
    except Exception as e:
        errors.append(f"av: {type(e).__name__}: {e}")
    raise ValueError("cannot open video (" + "; ".join(errors) + ")")


def target_size(h: int, w: int, policy: VideoPolicy) -> tuple[int, int]:
    """Decode size: long side <= max_side, short side >= min_side, aspect kept, multiples of `multiple`."""
    from preprocess.images import fit_scale

    scale = fit_scale(h, w, policy.min_side, policy.max_side)
    m = policy.multiple
    return max(m, int(round(h * scale / m)) * m), max(m, int(round(w * scale / m)) * m)


def clip_specs(meta: VideoMeta, policy: VideoPolicy) -> list[list[int]]:
    """Frame indices of each clip: evenly spaced, non-overlapping starts, deterministic."""
    if meta.height * meta.width > policy.max_pixels_per_frame:
        raise ValueError(f"frame size {meta.width}x{meta.height} above video.max_pixels_per_frame")
    stride = policy.frame_stride
    if policy.target_fps:
        stride = max(1, int(round(meta.fps / policy.target_fps)))
    span = (policy.frames_per_clip - 1) * stride + 1
    if meta.frames < span:
        n = min(policy.frames_per_clip, (meta.frames - 1) // stride + 1)
        n -= n % 4
        if n < policy.min_frames:
            raise ValueError(f"video too short: {meta.frames} frames < {policy.min_frames} at stride {stride}")
        return [list(range(0, n * stride, stride))]
    count = min(policy.max_clips_per_video, meta.frames // span)
    gap = (meta.frames - span) / max(count - 1, 1) if count > 1 else 0
    return [[int(math.floor(k * gap)) + i * stride for i in range(policy.frames_per_clip)] for k in range(count)]


class ClipReader:
    """Decodes clips of one video at one size with a single open decoder (clips in ascending order
    decode forward without re-seeking). Falls back to PyAV per clip when decord fails."""

    def __init__(self, path: str, size: tuple[int, int]):
        self.path, self.size = path, size
        self._vr = None
        self._decord_error: Exception | None = None

    def _reader(self):
        if self._vr is None and self._decord_error is None:
            try:
                import decord

                h, w = self.size
                self._vr = decord.VideoReader(self.path, width=w, height=h, num_threads=1)
            except Exception as e:
                self._decord_error = e
        return self._vr

    def clip(self, indices: list[int]) -> np.ndarray:
        """Exactly `indices` -> uint8 [T, h, w, 3]."""
        vr = self._reader()
        first = self._decord_error
        if vr is not None:
            try:
                return np.ascontiguousarray(vr.get_batch(indices).asnumpy())
            except Exception as e:
                first = e
        try:
            return _decode_clip_av(self.path, indices, self.size)
        except Exception as e:
            raise ValueError(f"cannot decode frames {indices[0]}..{indices[-1]}: decord: "
                             f"{type(first).__name__}; av: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._vr = None


def decode_clip(path: str, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """Decodes exactly `indices` at `size` (h, w) -> uint8 [T, h, w, 3]."""
    return ClipReader(path, size).clip(indices)


def _decode_clip_av(path: str, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    import av

    h, w = size
    wanted = set(indices)
    out: dict[int, np.ndarray] = {}
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(s)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24", width=w, height=h)
            if i >= max(indices):
                break
    missing = [i for i in indices if i not in out]
    if missing:
        raise ValueError(f"stream ended before frame {missing[0]}")
    return np.stack([out[i] for i in indices])

"""A small animated GIF of a video with the landmarks found drawn over it: hands found or not, at a glance."""

from __future__ import annotations

import io

import numpy as np

from pipeline.landmarks import TYPE_OFFSETS, TYPE_SIZES, TYPES

SIDE = 240  # pixels of the longer side of a preview frame
FRAME_MS = 66  # display time of a frame (about 15 fps)
# RGB colour of each part; the hands stand out (left blue, right red), the face is faint.
COLOURS = {"face": (150, 150, 150), "left_hand": (40, 90, 255), "pose": (40, 200, 40), "right_hand": (255, 50, 50)}


class PreviewWriter:
    """Collects drawn, shrunk frames; `gif_bytes()` encodes them (the same bytes for the same frames)."""

    def __init__(self, side: int = SIDE) -> None:
        self.side = side
        self.frames: list[np.ndarray] = []

    def add(self, rgb: np.ndarray, landmarks: np.ndarray) -> None:
        """Shrink `rgb` (H, W, 3) and draw its (543, 3) landmarks (normalized x, y) on it."""
        import cv2

        h, w = rgb.shape[:2]
        scale = self.side / max(h, w)
        small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        height, width = small.shape[:2]
        for kind in TYPES:
            points = landmarks[TYPE_OFFSETS[kind] : TYPE_OFFSETS[kind] + TYPE_SIZES[kind], :2]
            radius = 1 if kind == "face" else 2
            for x, y in points[np.isfinite(points).all(axis=1)]:
                cv2.circle(small, (int(x * width), int(y * height)), radius, COLOURS[kind], -1)
        self.frames.append(small)

    def gif_bytes(self) -> bytes:
        from PIL import Image

        images = [Image.fromarray(f) for f in self.frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=FRAME_MS, loop=0)
        return buf.getvalue()

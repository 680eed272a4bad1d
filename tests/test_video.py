"""pipeline.video: which decoded frames become frames of a sequence (timestamps, not headers), and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the video extra is not installed: pip install -e '.[video]'")

from pipeline import video  # noqa: E402
from pipeline.video import VideoError, VideoOptions, frames  # noqa: E402

pytestmark = pytest.mark.video
FPS = 20


def _write_video(path: Path, n: int, fps: float = FPS, size: tuple[int, int] = (64, 48)) -> Path:
    """A lossless-enough video whose frame i is grey level 8*i with a white block at the left edge."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(n):
        frame = np.full((size[1], size[0], 3), 8 * i, dtype=np.uint8)
        frame[:, :8] = 255
        writer.write(frame)
    writer.release()
    return path


def _levels(path: Path, opts: VideoOptions | None = None) -> list[int]:
    """The grey level index of each frame selected (from the middle of the picture)."""
    return [round(int(f[24, 40, 0]) / 8) for f in frames(path, opts or VideoOptions())]


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return _write_video(tmp_path / "clip.avi", 30)  # 1.5 s at 20 fps


def test_every_decoded_frame_by_default(clip: Path) -> None:
    assert _levels(clip) == list(range(30))
    first = next(frames(clip))
    assert first.shape == (48, 64, 3) and first.dtype == np.uint8


def test_resampling_by_timestamps(clip: Path) -> None:
    assert _levels(clip, VideoOptions(fps=10)) == list(range(0, 30, 2))
    assert _levels(clip, VideoOptions(fps=4)) == list(range(0, 30, 5))
    assert _levels(clip, VideoOptions(fps=60)) == list(range(30))  # never more frames than decoded


def test_trim_and_caps(clip: Path) -> None:
    assert _levels(clip, VideoOptions(start=0.5, end=1.0)) == list(range(10, 20))
    assert _levels(clip, VideoOptions(max_frames=7)) == list(range(7))
    assert _levels(clip, VideoOptions(start=0.25, max_seconds=0.5)) == list(range(5, 15))


def test_mirror_flips_left_right(clip: Path) -> None:
    plain, mirrored = next(frames(clip)), next(frames(clip, VideoOptions(mirror=True)))
    assert plain[:, 0].min() > 240 and mirrored[:, -1].min() > 240
    np.testing.assert_array_equal(mirrored, plain[:, ::-1])


def test_absurd_length_and_resolution(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "MAX_FRAMES", 10)
    with pytest.raises(VideoError, match="more than 10 frames"):
        list(frames(clip))
    assert len(list(frames(clip, VideoOptions(max_frames=25)))) == 25  # a cap the user chose is not refused
    monkeypatch.setattr(video, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(VideoError, match=r"clip.avi: 64x48 frames are over the 8K limit"):
        next(frames(clip))


def test_unusable_files(tmp_path: Path) -> None:
    empty, text = tmp_path / "empty.mp4", tmp_path / "text.mp4"
    empty.write_bytes(b"")
    text.write_text("not a video at all\n" * 100)
    cases = {
        empty: "empty file (0 bytes)",
        text: "not a video OpenCV can open (unknown container or codec)",
        tmp_path / "absent.mp4": "file not found",
        tmp_path: "not a regular file (a directory)",
    }
    for path, reason in cases.items():
        with pytest.raises(VideoError) as exc:
            next(frames(path))
        assert exc.value.reason == reason and str(exc.value) == f"{path}: {reason}"


def test_a_video_whose_header_lies_and_no_frame_decodes(shared_dir: Path) -> None:
    with pytest.raises(VideoError) as exc:
        next(frames(shared_dir / "videos" / "face.mp4"))
    assert exc.value.reason == "no frame decodes (the header claims 254970 frames at 90000 fps)"


def test_the_webm_header_claims_1000_fps_its_timestamps_say_otherwise(shared_dir: Path) -> None:
    demo = shared_dir / "videos" / "Kittu1209_GISLR_demo.webm"
    every = sum(1 for _ in frames(demo))
    per_second = sum(1 for _ in frames(demo, VideoOptions(fps=1)))
    assert every == 317
    assert 36 <= per_second <= 39  # about one a second over its 37.8 s, not one every 1000 frames

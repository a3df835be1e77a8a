"""A folder of videos: files (.mp4, .webm, .gif, .mkv, .avi, .mov, decoded with PyAV) and image sequences (a
sub-folder of .png/.jpg/.jpeg frames, in natural name order: frame_9 before frame_10) found anywhere below `path`.

A unit is one video: "file:REL" for a file, "images:REL" for a folder of frames, REL being its path below `path` in
POSIX style. Each video goes to "val" when a hash of REL falls below val_fraction, else to "train": the split of a
file never changes between builds, never depends on which other files are present or on listing order, and one
file never feeds both splits (clips cut from one recording into several files can still land in both: keep them
in one image folder or one file if that matters). Hidden files and folders (".name") are ignored.

Frames are resampled to `fps` (for each output time k / fps, the latest source frame shown at or before it, using
the decoder's timestamps, which for GIFs are their frame delays; image sequences have no timing and count as
already at `fps`), turned upright by the container's rotation, cropped, and resized to the data's resolution. Long
videos are cut into consecutive episodes of at most max_frames_per_episode frames. There are no ground-truth
actions. The files are only ever opened for reading.

Bad input raises GenieError naming the file, and the frame where decoding failed when it failed part-way: a file
that does not open, a decoder error, a frame the decoder marks corrupt, a video that ends well before the duration
its container declares (a truncated file), a GIF without its closing trailer byte, a video with no frames.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from fractions import Fraction
from pathlib import Path

import attrs
import numpy as np
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import non_negative, unit_interval
from genie_core.errors import GenieError
from genie_core.extras import missing_extra, require_extra
from genie_core.interfaces import Episode, VideoSource
from genie_core.io.media import MAX_PIXELS, resize_frames

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FILE, IMAGES = "file:", "images:"
RESIZE_BATCH = 32  # frames cropped, then resized together (bounds memory to a few full-size frames)
CROPS = ("center", "none")
TIMING_SLACK = Fraction(1, 1000)  # containers round timestamps (WebM to milliseconds): a frame this early still counts
TRUNCATION_SLACK = Fraction(1, 4)  # seconds (or 4 frames if longer) a video may fall short of its declared duration


@attrs.define(frozen=True, kw_only=True)
class VideoFolderConfig:
    """Defaults follow the paper's Platformers data set: 10 FPS clips."""

    path: str = attrs.field(default="", validator=v.instance_of(str))  # the folder; required (check_recipe says so)
    fps: float = attrs.field(default=10.0, validator=non_negative)  # target frame rate; 0 keeps each file's own
    val_fraction: float = attrs.field(default=0.1, validator=unit_interval)  # share of videos held out for evaluation
    max_frames_per_episode: int = attrs.field(default=0, validator=non_negative)  # longer videos are cut; 0: no limit
    # "center": the largest centred square, then resized; "none": the whole frame squashed into the square. Centre
    # cropping is the default because squashing stretches every object by the aspect ratio (16:9 footage shrinks
    # horizontally by 1.78x), and by a different amount for files of different shapes, so the tokenizer and the
    # dynamics would have to learn several geometries of the same world; a crop only loses the edges of the picture.
    crop: str = attrs.field(default="center", validator=v.in_(CROPS))


def _natural_key(name: str) -> list:
    """'frame_9.png' before 'frame_10.png'; zero-padded names sort as plain text does."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _scan(root: Path) -> list[str]:
    """Unit keys of every video below root, sorted."""

    def fail(error: OSError):
        raise GenieError(f"{error.filename}: cannot list the folder ({error.strerror or error})")

    keys = []
    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder).relative_to(root)
        names = [f for f in files if not f.startswith(".")]
        keys += [FILE + (here / f).as_posix() for f in names if f.lower().endswith(VIDEO_EXTENSIONS)]
        if here != Path(".") and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in names):
            keys.append(IMAGES + here.as_posix())
    return sorted(keys)


def split_of(rel: str, val_fraction: float) -> str:
    """The split of the video at `rel`: sha1 of the path (NFC, so macOS and Linux names agree) -> [0, 1)."""
    digest = hashlib.sha1(unicodedata.normalize("NFC", rel).encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _crop_square(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return frame[top : top + side, left : left + side]


class _Frames:
    """Collects output frames: crops each, resizes them in batches; `array()` is uint8 [L, res, res, 3]."""

    def __init__(self, resolution: int, crop: str):
        self.resolution, self.crop = resolution, crop
        self.done: list[np.ndarray] = []
        self.batch: list[np.ndarray] = []

    def add(self, rgb: np.ndarray) -> None:
        if self.crop == "center":
            rgb = _crop_square(rgb)
        if self.batch and self.batch[0].shape != rgb.shape:  # the picture size changed mid-video
            self._flush()
        self.batch.append(rgb)
        if len(self.batch) >= RESIZE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.batch:
            self.done.append(resize_frames(np.stack(self.batch), self.resolution))
            self.batch = []

    def array(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.done)


def _rgb(frame) -> np.ndarray:
    """A decoded PyAV frame -> uint8 [H, W, 3], turned upright by its display matrix (right angles only)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # counter-clockwise quarter turns that show it upright
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _declared_duration(container, stream) -> Fraction | None:
    """How long the container says the video stream lasts, where it says so (else None)."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")  # Matroska / WebM per-track tag
    if tag:
        match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag.strip())
        if match:
            h, m, s = match.groups()
            return int(h) * 3600 + int(m) * 60 + Fraction(s)
    if container.duration and len(container.streams) == 1:  # the container's length is the video's only if alone
        return Fraction(container.duration, 1_000_000)
    return None


def _gif_is_complete(path: Path) -> bool:
    """A GIF ends with the trailer byte 0x3B (some writers pad with zeros after it); a truncated one does not."""
    with open(path, "rb") as file:
        file.seek(max(0, os.fstat(file.fileno()).st_size - 256))
        return file.read().rstrip(b"\0").endswith(b"\x3b")


class VideoFolderSource(VideoSource):
    config_class = VideoFolderConfig

    def __init__(self, config, spec):
        super().__init__(config, spec)
        if spec.channels != 3:
            raise GenieError(f"source video-folder: delivers RGB frames (3 channels), not {spec.channels}")

    @classmethod
    def tiny_config(cls):
        # No folder can be named here: a recipe (or a test) sets `path`. Short episodes keep test builds small.
        return VideoFolderConfig(fps=10.0, max_frames_per_episode=32)

    @staticmethod
    def check_recipe(config, data, train):  # noqa: ARG004 - the check_recipe signature
        if not config.path:
            return ["'path' is empty: set it to the folder of videos"]
        root = Path(config.path).expanduser()
        if not root.is_dir():
            return [f"'path' {config.path!r}: folder not found" + (" (it is a file)" if root.exists() else "")]
        try:
            keys = _scan(root)
        except GenieError as error:
            return [f"'path' {config.path!r}: {error}"]
        if not keys:
            return [f"'path' {config.path!r}: no video inside (files ending {', '.join(VIDEO_EXTENSIONS)}, or "
                    f"sub-folders of {', '.join(IMAGE_EXTENSIONS)} frames)"]
        problems = []
        missing = missing_extra("video")
        if missing is not None and any(key.startswith(FILE) for key in keys):  # folders of frames need no PyAV
            problems.append(f"'path' {config.path!r} holds video files; decoding them {missing}")
        splits = [split_of(key.partition(":")[2], config.val_fraction) for key in keys]
        for split, hint in (("train", "lower"), ("val", "raise")):
            if split not in splits:
                problems.append(f"'path' {config.path!r}: none of its {len(keys)} videos falls in the {split} split "
                                f"with val_fraction {config.val_fraction}; add videos or {hint} val_fraction")
        least = getattr(data, "min_episode_frames", 1)
        if 0 < config.max_frames_per_episode < least:
            problems.append(f"'max_frames_per_episode' {config.max_frames_per_episode} is below "
                            f"data.min_episode_frames {least}: every episode would be dropped")
        return problems

    # ----------------------------------------------------------------------------------------------- units

    def root(self) -> Path:
        if not self.config.path:
            raise GenieError("source video-folder: 'path' is empty; set it to the folder of videos")
        root = Path(self.config.path).expanduser()
        if not root.is_dir():
            raise GenieError(f"{root}: folder of videos not found (source video-folder 'path')")
        return root

    def units(self):
        root = self.root()
        keys = _scan(root)
        if not keys:
            raise GenieError(f"{root}: no video inside (files ending {', '.join(VIDEO_EXTENSIONS)}, or sub-folders "
                             f"of {', '.join(IMAGE_EXTENSIONS)} frames)")
        if any(key.startswith(FILE) for key in keys):  # before any is built, not at the first file
            require_extra("video", f"source 'video-folder' ({root} holds video files)")
        splits: dict[str, list[str]] = {"train": [], "val": []}
        for key in keys:
            splits[split_of(key.partition(":")[2], self.config.val_fraction)].append(key)
        return splits

    def record(self, unit):
        root = self.root()
        kind, rel = unit.split(":", 1) if ":" in unit else ("", unit)
        path = root / rel
        if kind + ":" == FILE:
            frames, source_fps = self._decode_video(path)
        elif kind + ":" == IMAGES:
            frames, source_fps = self._read_images(path)
        else:
            raise GenieError(f"source video-folder: unit {unit!r} is neither {FILE}PATH nor {IMAGES}PATH")
        size = self.config.max_frames_per_episode or len(frames)
        return [Episode(frames=frames[start : start + size], actions=None,
                        meta={"file": rel, "part": part, "source_fps": source_fps})
                for part, start in enumerate(range(0, len(frames), size))]

    # ----------------------------------------------------------------------------------------------- decoding

    def _decode_video(self, path: Path) -> tuple[np.ndarray, float | None]:
        require_extra("video", "source 'video-folder' (decoding video files)")
        import av  # here, not at the top: PyAV is only needed for video files

        target = Fraction(self.config.fps).limit_denominator(1_000_000) if self.config.fps else None
        out = _Frames(self.spec.resolution, self.config.crop)
        decoded = 0  # source frames decoded so far: the index of the frame being decoded when an error comes
        opened = False
        try:
            with av.open(str(path), mode="r") as container:
                opened = True
                if not container.streams.video:
                    raise GenieError(f"{path}: holds no video stream")
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
                if width * height > MAX_PIXELS:
                    raise GenieError(f"{path}: frames of {width}x{height} pixels, more than the {MAX_PIXELS:,} a "
                                     f"frame may have")
                stream.thread_type = "AUTO"
                rate = stream.average_rate or stream.guessed_rate  # fallback timing for frames without timestamps
                slack = max(Fraction(stream.time_base or 0), TIMING_SLACK)
                first = last = previous = None  # times (s) of the first, latest and the one before frames
                duration = None  # how long the latest frame is shown, where the decoder says
                held, held_rgb = None, None  # the latest frame (for resampling) and its pixels, once converted
                k = 0  # the next output frame, shown at time k / target
                for frame in container.decode(stream):
                    if getattr(frame, "is_corrupt", False):
                        raise GenieError(f"{path}: cannot decode frame {decoded}: the decoder marks it corrupt")
                    if frame.pts is not None and frame.time_base:
                        t = frame.pts * frame.time_base
                    elif rate:
                        t = decoded / Fraction(rate)
                    else:  # no timing at all: like an image sequence, already at the target rate
                        t = decoded / (target or 1)
                    first = t if first is None else first
                    t = max(t, last) if last is not None else t  # timestamps never step back
                    previous, last = last, t
                    shown = getattr(frame, "duration", None)  # PyAV >= 13
                    duration = shown * frame.time_base if shown and frame.time_base else None
                    decoded += 1
                    if target is None:
                        out.add(_rgb(frame))
                        continue
                    while held is not None and k / target < t - first - slack:  # outputs before this frame shows
                        held_rgb = _rgb(held) if held_rgb is None else held_rgb
                        out.add(held_rgb)
                        k += 1
                    held, held_rgb = frame, None
                if decoded == 0:
                    raise GenieError(f"{path}: holds no video frames")
                if duration is None:  # the last frame lasts as long as the one before, or one frame at the rate
                    duration = last - previous if previous is not None and last > previous else \
                        (1 / Fraction(rate) if rate else 1 / (target or 1))
                span = last - first + duration  # how long the decoded video lasts
                if target is not None:
                    while k / target < span - slack or k == 0:
                        held_rgb = _rgb(held) if held_rgb is None else held_rgb
                        out.add(held_rgb)
                        k += 1
                declared = _declared_duration(container, stream)
                if declared is not None and declared - span > max(TRUNCATION_SLACK, 4 * span / decoded):
                    raise GenieError(f"{path}: cannot decode frame {decoded}: the video ends after {float(span):.2f} s "
                                     f"of the {float(declared):.2f} s its container declares (a truncated file?)")
        except GenieError:
            raise
        except (av.FFmpegError, OSError, ValueError, EOFError) as error:
            where = f"cannot decode frame {decoded}" if opened else "cannot open as a video"
            reason = getattr(error, "strerror", None) or str(error)  # PyAV's str() repeats the file name
            raise GenieError(f"{path}: {where}: {reason}") from None
        if path.suffix.lower() == ".gif" and not _gif_is_complete(path):
            raise GenieError(f"{path}: cannot decode frame {decoded}: the GIF ends without its trailer byte "
                             f"(a truncated file?)")
        return out.array(), round(float(decoded / span), 3)

    def _read_images(self, folder: Path) -> tuple[np.ndarray, float | None]:
        from PIL import Image, ImageOps

        if not folder.is_dir():
            raise GenieError(f"{folder}: folder of frames not found")
        names = sorted((f.name for f in folder.iterdir()
                        if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS)),
                       key=_natural_key)
        if not names:
            raise GenieError(f"{folder}: holds no video frames ({', '.join(IMAGE_EXTENSIONS)} files)")
        out = _Frames(self.spec.resolution, self.config.crop)
        for index, name in enumerate(names):
            try:
                with Image.open(folder / name) as image:
                    if image.width * image.height > MAX_PIXELS:  # asked of the header, before any decoding
                        raise GenieError(f"{folder}: frame {index} ({name}) is {image.width}x{image.height} pixels, "
                                         f"more than the {MAX_PIXELS:,} a frame may have")
                    rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
                raise GenieError(f"{folder}: cannot decode frame {index} ({name}): {error}") from None
            out.add(rgb)
        return out.array(), float(self.config.fps) if self.config.fps else None


@hookimpl
def genie_register_components(registrar):
    registrar.add_source("video-folder", VideoFolderSource)

"""Pictures of results: GIFs and PNG strips of videos, upscaled with nearest neighbour so pixels stay crisp."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from genie_core.errors import GenieError


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, C, H, W] in [0, 1] -> [T, H, W, C] uint8."""
    return (frames.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def tile(videos: list[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Side by side: a list of [T, C, H, W] videos of equal shape -> one [T, C, H, W'] video, white gaps between."""
    t, c, h, _ = videos[0].shape
    spacer = torch.ones(t, c, h, gap)
    parts = []
    for i, video in enumerate(videos):
        parts += [video.cpu().float()] + ([spacer] if i < len(videos) - 1 else [])
    return torch.cat(parts, dim=-1)


def uint8_frames(frames: torch.Tensor) -> Iterator[np.ndarray]:
    """[T, C, H, W] in [0, 1] -> [H, W, C] uint8 frames, converted one at a time as they are asked for."""
    for frame in frames:
        yield to_uint8(frame[None])[0]


def _images(frames: Iterable[np.ndarray], scale: int) -> Iterator[Image.Image]:
    for f in frames:
        yield Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)


CAPTION_HEIGHT = 14  # pixels of the white bar above captioned GIFs


def save_gif(frames: torch.Tensor | Iterable[np.ndarray], path, scale: int = 3, fps: int = 4,
             captions: list[str] | None = None, gap: int = 2) -> None:
    """[T, C, H, W] in [0, 1], or uint8 frames [H, W, 3] (a list, or any iterable: one that raises stops the
    encoding) -> an endlessly looping GIF; `path` may also be a binary file object. `captions`: one per panel of a
    `tile`d video (panels of equal width, `gap` pixels apart), written above each. Each frame is converted and
    upscaled when the encoder reaches it: no copy of the whole video is made (PIL keeps each frame's palette image,
    one byte per output pixel, until it writes the file)."""
    images = _images(uint8_frames(frames) if isinstance(frames, torch.Tensor) else frames, scale)
    if captions:
        images = (_captioned(image, captions, gap * scale) for image in images)
    first = next(images, None)
    if first is None:
        raise GenieError("a GIF needs at least one frame; got none")
    first.save(path, format="GIF", save_all=True, append_images=images, duration=int(1000 / fps), loop=0)


def _captioned(image: Image.Image, captions: list[str], gap: int) -> Image.Image:
    panel = (image.width - gap * (len(captions) - 1)) // len(captions)
    out = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), "white")
    out.paste(image, (0, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(out)
    for i, caption in enumerate(captions):
        draw.text((i * (panel + gap) + 2, 1), caption, fill="black")
    return out


def save_strip(frames: torch.Tensor, path: Path, scale: int = 3) -> None:
    """All frames of [T, C, H, W] in one row."""
    save_png(tile(list(frames[:, None])).squeeze(0), path, scale)


def save_png(image: torch.Tensor, path, scale: int = 1) -> None:
    """[C, H, W] in [0, 1] -> PNG; `path` may also be a binary file object."""
    next(_images(uint8_frames(image[None]), scale)).save(path, format="PNG")


def load_image(path: Path, size: tuple[int, int], max_bytes: int = 20_000_000) -> torch.Tensor:
    """An image file -> [C, H, W] float in [0, 1], resized to (height, width)."""
    path = Path(path)
    if not path.is_file():
        raise GenieError(f"{path}: image file not found")
    if path.stat().st_size > max_bytes:
        raise GenieError(f"{path}: image is larger than {max_bytes} bytes")
    with open(path, "rb") as file:
        return decode_image(file, size, str(path))


MAX_PIXELS = 50_000_000  # the largest picture or video frame read (an 8K frame is 33 million): no decompression bombs


def decode_image(file, size: tuple[int, int], name: str, formats: tuple[str, ...] | None = None,
                 max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image in a binary file object -> [C, H, W] float in [0, 1], resized to (height, width). `name` names it
    in errors; `formats` (PIL's names, e.g. PNG, JPEG) limits what is accepted."""
    try:
        with Image.open(file) as image:
            if formats and image.format not in formats:
                raise GenieError(f"{name}: a {image.format} image; accepted: {', '.join(formats)}")
            if image.width * image.height > max_pixels:  # checked before decoding: no decompression bombs
                raise GenieError(f"{name}: {image.width}x{image.height} pixels is more than the {max_pixels} allowed")
            rgb = image.convert("RGB")
    except GenieError:
        raise
    except UnidentifiedImageError:
        raise GenieError(f"{name}: not an image (no image format recognised)") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for broken files
        raise GenieError(f"{name}: not a readable image ({error})") from None
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255


def resize_frames(frames: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [L, H, W, C] -> uint8 [L, resolution, resolution, C], area-averaged (no aliasing when shrinking)."""
    if frames.shape[1:3] == (resolution, resolution):
        return frames
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    mode = "area" if min(frames.shape[1:3]) >= resolution else "bilinear"  # area only ever shrinks well
    t = torch.nn.functional.interpolate(t, size=(resolution, resolution), mode=mode)
    return t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

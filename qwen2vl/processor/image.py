"""Images: decoding, RGB, `smart_resize`, and the resizes shared with video. Normalizing and
patchifying happen where the vision tower runs (`qwen2vl.layers.patchify`).

The reference resizes twice: qwen_vl_utils first (PIL bicubic, per-item limits or its own
4..16384-token defaults), then transformers' image processor (torch bicubic with antialias, the
processor's `min_pixels`/`max_pixels`). The second step only changes the size when the processor's
limits are tighter than the first step's, but then it does, so we do both.
"""
from __future__ import annotations

import functools
import io
import math
import re
import warnings

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor.fetch import MediaPolicy, resolve
from qwen2vl.processor.pool import media_map, media_workers
from qwen2vl.processor.types import MediaOptions

MAX_ASPECT_RATIO = 200
IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 16384
# From this many output pixels on, a resize's passes run in bands on the media pool; below it the
# bands' copies and hand-offs eat the gain.
BANDED_RESIZE_MIN_PIXELS = 1 << 20


def smart_resize(
    height: float, width: float, factor: int = 28, min_pixels: float | None = None, max_pixels: float | None = None
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Defaults are qwen_vl_utils' image limits (4 and 16384 tokens of `factor`x`factor` pixels).
    """
    min_pixels = IMAGE_MIN_TOKENS * factor * factor if min_pixels is None else min_pixels
    max_pixels = IMAGE_MAX_TOKENS * factor * factor if max_pixels is None else max_pixels
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels ({min_pixels}) is greater than max_pixels ({max_pixels})", field="min_pixels")
    if height < 1 or width < 1:
        raise MediaError(f"image is empty ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(
            f"aspect ratio of {width}x{height} is over the limit of {MAX_ASPECT_RATIO}:1"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_target_size(height: int, width: int, options: MediaOptions, factor: int) -> tuple[int, int]:
    """qwen_vl_utils' size for one image (or one frame of a frame-list video)."""
    if options.resized_height is not None:
        return smart_resize(options.resized_height, options.resized_width, factor)
    return smart_resize(height, width, factor, options.min_pixels, options.max_pixels)


def open_image(image, policy: MediaPolicy, max_source_pixels: int) -> Image.Image:
    """A lazily decoded PIL image (its size is known from the header) from any supported source.

    Its size is the caller's to check (`MediaBudget.check_source`); `max_source_pixels` is that
    limit, named where PIL refuses an image too large to read even its header.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and isinstance(image.get("url"), str):  # OpenAI-style {"url": ...}
        image = image["url"]
    if not isinstance(image, str):
        raise MediaError(f"an image must be a path, URL, base64 string or PIL image, got {type(image).__name__}")
    source = resolve(image, policy)
    try:
        with warnings.catch_warnings():
            # Our own limit applies below; PIL's warning threshold is its default for that limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source.path if source.path is not None else io.BytesIO(source.data))
    except Image.DecompressionBombError as e:
        # PIL refuses before the size can be read; its message carries the pixel count.
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{pixels.group(1)} pixels" if pixels else "larger than PIL accepts"
        if pixels and int(pixels.group(1)) <= max_source_pixels:
            raise MediaError(f"the image is {size}, over PIL's decompression-bomb limit of "
                             f"{2 * Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)") from None
        raise MediaError(f"the image is {size}, over the limit of {max_source_pixels} pixels") from None
    except UnidentifiedImageError:
        raise MediaError(source.not_a("image", "PIL")) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot read image: {e}") from None
    return opened


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; RGBA is composited on white, other modes converted as PIL does (as the reference)."""
    try:
        if image.mode == "RGBA":
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            return background
        if image.mode == "RGB":  # convert() would copy it
            image.load()
            return image
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot decode image: {e}") from None


def resize_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL bicubic resize of an RGB image, as a uint8 `[3, height, width]` tensor.

    A large image's resize runs on the media pool's threads (PIL releases the GIL), in bands that
    are exactly what PIL computes: PIL resizes in two passes, each along one axis, and each
    output row of the horizontal pass depends on that input row alone (each column of the vertical
    pass on that column alone), so each pass splits into bands across the other axis. The passes
    run in PIL's own order, which matters (each pass rounds to uint8).
    """
    if image.size != (width, height):
        order = None if height * width < BANDED_RESIZE_MIN_PIXELS or media_workers() < 2 else \
            _pass_order(*image.size, width, height)
        if order is None:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        else:
            for pass_width, pass_height in order:
                image = _one_pass_in_bands(image, pass_width, pass_height)
    return pil_to_tensor(image)


def _pass_order(src_width: int, src_height: int, width: int, height: int) -> list[tuple[int, int]] | None:
    """The sizes after each of PIL's resize passes (the ones it runs), or None where this Pillow's
    order is unknown."""
    vertical_first_rule = _pillow_vertical_first_rule()
    if vertical_first_rule is None:
        return None
    # Pillow >= 11.3: "if height is being scaled down more than twice the amount the width is, run
    # the vertical pass first"
    vertical_first = vertical_first_rule and 0 < src_height - height and src_height - height > 2 * (src_width - width)
    if vertical_first:
        sizes = [(src_width, height), (width, height)]
    else:
        sizes = [(width, src_height), (width, height)]
    previous, passes = (src_width, src_height), []
    for size in sizes:
        if size != previous:
            passes.append(size)
        previous = size
    return passes


@functools.cache
def _pillow_vertical_first_rule() -> bool | None:
    """Whether this Pillow runs the vertical pass first where the height shrinks more than twice
    as much as the width (True), always the horizontal pass first (False), or neither (None: no
    banding), seen on a small noise image where the two orders round differently."""
    values = (torch.arange(96 * 48 * 3, dtype=torch.int64) * 2654435761 % 251).to(torch.uint8)
    probe = Image.fromarray(values.view(96, 48, 3).numpy())
    bicubic = Image.Resampling.BICUBIC
    full = probe.resize((40, 24), bicubic).tobytes()
    horizontal_first = probe.resize((40, 96), bicubic).resize((40, 24), bicubic).tobytes()
    vertical_first = probe.resize((48, 24), bicubic).resize((40, 24), bicubic).tobytes()
    if horizontal_first == vertical_first:
        return None
    return {horizontal_first: False, vertical_first: True}.get(full)


def _one_pass_in_bands(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` resized along one axis (the other size unchanged), computed in bands across the
    other axis on the media pool."""
    src_width, src_height = image.size
    workers = min(media_workers(), src_height if height == src_height else src_width)  # no empty band
    if height == src_height:  # horizontal pass: bands of rows
        edges = [src_height * i // workers for i in range(workers + 1)]
        bands = [((0, a, src_width, b), (width, b - a), (0, a)) for a, b in zip(edges, edges[1:])]
    else:  # vertical pass: bands of columns
        edges = [src_width * i // workers for i in range(workers + 1)]
        bands = [((a, 0, b, src_height), (b - a, height), (a, 0)) for a, b in zip(edges, edges[1:])]
    pieces = media_map(lambda band: image.crop(band[0]).resize(band[1], Image.Resampling.BICUBIC), bands)
    out = Image.new("RGB", (width, height))
    for piece, (_, _, offset) in zip(pieces, bands):
        out.paste(piece, offset)
    return out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3).permute(2, 0, 1)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of `[T, 3, H, W]`; uint8 stays uint8 (rounded), float stays float.

    uint8 goes through float32 with clamp and round, which is what torchvision's tensor resize does
    and what the reference's video path uses.
    """
    if frames.shape[-2:] == (height, width):
        return frames
    resized = F.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    if frames.dtype == torch.uint8:
        return resized.clamp_(0, 255).round_().to(torch.uint8)
    return resized


def resize_image_tensor(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 `[3, H, W]` bicubic antialiased resize with torch's native uint8 kernel.

    transformers' image processor resizes uint8 images on the CPU this way (not via float32).
    """
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)[0]

"""The image rule: how every image read from a dataset becomes 8-bit RGB.

SFT, RL and Evaluation each hold an identical copy of this module (the trees never import each other;
each tree's tests check that the three copies are the same). Applied in this order:

1. EXIF orientation first (ImageOps.exif_transpose): the image is used as a viewer shows it, and every
   size recorded for it (prepare_data's width/height) is the size after rotation.
2. 16-bit samples (modes I;16, I;16L, I;16B, I;16N, and mode I holding values in 0..65535, which is
   what 16-bit PNG/TIFF decode to in some Pillow versions) keep their high byte: v >> 8, so 0 -> 0,
   65535 -> 255, monotone, all 256 levels. PIL's own decoder does the same for 16-bit RGB, RGBA and LA
   PNGs and TIFFs (they arrive here already 8-bit), so grey and colour 16-bit images agree. PIL's
   convert("RGB") instead clips such values at 255, which turned a 0..65535 gradient into two values.
   Mode I with values outside 0..65535 (a 32-bit integer TIFF) has no known bit depth: ImageError.
3. Mode F (32-bit float): values all within [0, 1] are scaled by 255; values all within [0, 255] are
   used as they are; anything else (or NaN / inf) is ImageError, never silently clipped. Rounded.
4. Transparency (an alpha band: RGBA, LA, PA, La, RGBa; or a transparent colour or palette entry in
   info["transparency"], as PNG tRNS and GIF carry) is composited on opaque white with
   Image.alpha_composite: out = c * a/255 + 255 * (1 - a/255), rounded, so a half-transparent
   (a = 128) red pixel becomes (255, 127, 127). This is what transformers' convert_to_rgb (the Qwen
   MLLM processors) does. The reference training code uses a bare convert("RGB"), which drops alpha
   and shows whatever colour transparent pixels store (often black); on opaque images the two agree.
5. Everything else goes through PIL's convert("RGB"): L and 1 are replicated to three channels
   (1 -> 0 / 255), P through its palette, CMYK as R = (255 - C)(255 - K) / 255 (PIL's formula; Adobe
   inverted CMYK JPEGs are un-inverted by PIL's decoder), YCbCr by the JPEG equations. Embedded ICC
   profiles are not applied (as in the reference). Multi-frame files give their first frame.

Decoding is strict: open_rgb8 decodes every pixel (img.load()), so a truncated file is an error, and
refuses to run when PIL.ImageFile.LOAD_TRUNCATED_IMAGES has been switched on (it would hide truncation).
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ORIENTATION = 0x0112  # the EXIF orientation tag
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # the ones that rotate by 90 degrees (width and height swap)


class ImageError(ValueError):
    """An image that cannot be decoded or has no defined 8-bit RGB form; the message names where it is."""


def _where(where: str) -> str:
    return f"{where}: " if where else ""


def to_rgb8(img: Image.Image, where: str = "") -> Image.Image:
    """Any PIL image -> a new 8-bit RGB image by the rule above (decodes `img` if it is not loaded yet).

    (W, H) of the result is img's size after EXIF orientation.
    """
    img = ImageOps.exif_transpose(img)  # a new image; EXIF orientation removed
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"{_where(where)}32-bit integer image with values {arr.min()}..{arr.max()} outside "
                             "0..65535: its bit depth is unknown, so it has no defined 8-bit form")
        grey = Image.fromarray((arr >> 8).astype(np.uint8))
        t = img.info.get("transparency")
        if isinstance(t, int):  # 16-bit PNG tRNS: the one transparent grey value
            alpha = np.where(arr == t, 0, 255).astype(np.uint8)
            return _on_white(Image.merge("LA", (grey, Image.fromarray(alpha))))
        return grey.convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all():
            raise ImageError(f"{_where(where)}float image holds NaN or infinite values")
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            raise ImageError(f"{_where(where)}float image with values {lo:g}..{hi:g}: neither within [0, 1] "
                             "nor within [0, 255], so it has no defined 8-bit form")
        return Image.fromarray(np.floor(arr + 0.5).astype(np.uint8)).convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        return _on_white(img)
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as exc:  # a mode PIL cannot convert (e.g. LAB)
        raise ImageError(f"{_where(where)}image mode {mode} cannot be converted to RGB ({exc})") from None


def _on_white(img: Image.Image) -> Image.Image:
    """Composite on opaque white (rule 4)."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def open_rgb8(source: Union[str, os.PathLike, bytes, bytearray], where: str = "") -> Image.Image:
    """A path or encoded bytes -> fully decoded 8-bit RGB (to_rgb8); any failure -> ImageError naming `where`."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageError(f"{_where(where)}PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on (something in this process set "
                         "it); truncated images would decode silently. Leave it off.")
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(fp) as im:
            im.load()  # every pixel: a truncated file fails here, not at its first training batch
            return to_rgb8(im, where)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types for damaged data (OSError, SyntaxError, zlib.error, ...)
        raise ImageError(f"{_where(where)}image could not be decoded ({type(exc).__name__}: {exc})") from None


def check_encoded(data: bytes, where: str = "") -> tuple[str, int, int]:
    """(PIL format name, width, height after the rule) of encoded image bytes, for the prepare scripts.

    Checks the file's structure (Image.verify: chunk CRCs, a PNG's missing end) and then decodes every
    pixel through open_rgb8; a damaged, truncated or unconvertible image raises ImageError naming `where`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageError(f"{_where(where)}image could not be decoded ({type(exc).__name__}: {exc})") from None
    rgb = open_rgb8(data, where)
    return fmt, rgb.width, rgb.height


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) that to_rgb8 will give `img`: its size with EXIF orientation applied, without decoding pixels
    (PNGs whose EXIF follows the pixel data are an exception: PIL reads them to find it)."""
    w, h = img.size
    return (h, w) if img.getexif().get(ORIENTATION) in SWAPPING_ORIENTATIONS else (w, h)

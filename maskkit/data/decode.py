"""Reading one image file into 8-bit pixels, correctly for every depth PIL opens.

`open_image` turns PIL's failures (an undecodable or truncated file, a decompression bomb) into a
one-line `DataError` naming the file; `to_8bit` converts any mode to 8-bit L or RGB: 16-bit and
32-bit integer grey scaled from [0, 65535], float grey kept from [0, 1] (refused outside it or
non-finite), palette and alpha images composited over black. File names in messages are escaped
(`shown_path`: bytes that are not UTF-8, newlines).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from maskkit.data.source import DataChangedError, DataError
from maskkit.options import shown_path

__all__ = ["GREY_MODES", "open_image", "to_8bit"]

#: PIL modes read as one grey channel
GREY_MODES = ("L", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F", "LA", "La")
_WIDE_INT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def open_image(path: Path, size: int | None = None) -> Any:
    """The decoded PIL image of `path` (pixels loaded); DataError naming the file if it cannot be, and
    `DataChangedError` if it is missing or its size in bytes is not `size` (what a file index recorded)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            found = os.fstat(f.fileno()).st_size
            if size is not None and found != size:
                raise DataChangedError(f"image {shown_path(path)} changed since the folder was listed ({size} -> {found} bytes)")
            picture = Image.open(f)  # the file is ours: PIL reads it all in load() and leaves closing it to us
            picture.load()
            return picture
    except DataError:
        raise
    except FileNotFoundError:
        if size is None:
            raise DataError(f"cannot read image {shown_path(path)}: it does not exist") from None
        raise DataChangedError(f"image {shown_path(path)} is missing (the folder changed since it was listed)") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"cannot read image {shown_path(path)}: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise DataError(f"cannot read image {shown_path(path)}: {err or type(err).__name__}") from None


def to_8bit(pic: Any, mode: str, path: Path) -> Any:
    """`pic` as an 8-bit PIL image of `mode` ("L" or "RGB"), its values scaled, not clipped."""
    from PIL import Image

    if pic.mode in _WIDE_INT:
        values = np.asarray(pic).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"image {shown_path(path)} holds integer pixels outside [0, 65535] "
                            f"(min {values.min():g}, max {values.max():g})")  # fmt: skip
        pic = Image.fromarray(np.round(values * (255 / 65535)).astype(np.uint8), "L")
    elif pic.mode == "F":
        values = np.asarray(pic).astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"image {shown_path(path)} holds non-finite float pixels")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise DataError(f"image {shown_path(path)} holds float pixels outside [0, 1] (min {values.min():g}, "
                            f"max {values.max():g}); rescale it to [0, 1]")  # fmt: skip
        pic = Image.fromarray(np.round(values * 255).astype(np.uint8), "L")
    elif pic.mode in _ALPHA or "transparency" in pic.info:
        rgba = pic.convert("RGBA")
        pic = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return pic.convert(mode)

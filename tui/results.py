"""The final images of a run as uint8 arrays: the generated one and the reference (full
precision, full steps, same seed and prompt), from a RunResult or its JSON document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_images", "read_image"]


def read_image(src: Any) -> np.ndarray | None:
    """An image from an array or a PNG path (Pillow, imported only here); None if absent."""
    if src is None:
        return None
    if isinstance(src, np.ndarray):
        return src.astype(np.uint8, copy=False)
    path = Path(str(src))
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _first(*vals: Any) -> Any:
    return next((v for v in vals if v is not None), None)


def load_images(result: Any, doc: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    meta = doc.get("meta") or {}
    gen = _first(getattr(result, "image_array", None), getattr(result, "image_rgb", None))
    ref = _first(getattr(result, "reference_array", None), getattr(result, "reference_rgb", None))
    gen = read_image(gen if gen is not None else _first(doc.get("image"), meta.get("image")))
    ref = read_image(ref if ref is not None else _first(doc.get("reference"), doc.get("reference_image"),
                                                        meta.get("reference"), meta.get("reference_image")))
    return gen, ref

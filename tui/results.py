"""The final image of a run as a uint8 array, from a RunResult or its JSON document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_image", "read_image"]


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


def load_image(result: Any, doc: dict[str, Any]) -> np.ndarray | None:
    """The run's image from the RunResult, or from its result document's path."""
    gen = getattr(result, "image_array", None)
    return read_image(gen if gen is not None else doc.get("image"))

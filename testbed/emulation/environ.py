"""The environment of every process the testbed starts: an allow-list, never the caller's
whole environment (which may hold HF_TOKEN, cloud keys, a password manager's socket ...).

Kept: PATH, the locale (LANG, LANGUAGE, LC_*), TZ, TMPDIR, VIRTUAL_ENV and the variables of
Python, the testbed, the thread pools (OMP_*, MKL_*, OPENBLAS_*, KMP_*), torch, CUDA,
NVIDIA, Hugging Face (cache paths, offline switches), diffusers/transformers, Docker's
client and coverage — except any whose name says it holds a secret (TOKEN, SECRET,
PASSWORD, KEY, CREDENTIAL, AUTH ...), which no prefix lets through. HOME becomes a
directory that does not exist (`HARMLESS_HOME`) unless the caller keeps its own; then
HF_HOME names the caller's Hugging Face cache, so a model cached there is still found.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = ["HARMLESS_HOME", "ALLOWED_NAMES", "ALLOWED_PREFIXES", "is_allowed", "clean_environ"]

HARMLESS_HOME = "/nonexistent"
ALLOWED_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV", "TERM"})
ALLOWED_PREFIXES = ("LC_", "PYTHON", "TESTBED_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "TORCH_", "CUDA_", "NVIDIA_",
                    "HF_", "HUGGINGFACE_HUB_", "TRANSFORMERS_", "DIFFUSERS_", "DOCKER_", "COVERAGE_")
_SECRET = re.compile(r"TOKEN|SECRET|PASS(WORD|WD|PHRASE)?(_|$)|(^|_)(API_?)?KEY(_|$)|CREDENTIAL|AUTH|PRIVATE|COOKIE|"
                     r"SESSION")


def is_allowed(name: str) -> bool:
    """Whether a variable of the caller's environment may reach a started process."""
    if _SECRET.search(name.upper()):
        return False
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)


def _hf_home(source: Mapping[str, str]) -> str | None:
    """Where huggingface_hub looks for its cache with `source` as the environment."""
    if source.get("HF_HOME"):
        return source["HF_HOME"]
    cache = source.get("XDG_CACHE_HOME") or (os.path.join(source["HOME"], ".cache") if source.get("HOME") else None)
    return os.path.join(cache, "huggingface") if cache else None


def clean_environ(extra: Mapping[str, str] | None = None, *, source: Mapping[str, str] | None = None,
                  home: str | None = HARMLESS_HOME) -> dict[str, str]:
    """The allowed part of `source` (default: this process's environment), HOME set to
    `home` (None: the source's own), then `extra` (the caller's own variables, as given)."""
    source = os.environ if source is None else source
    env = {k: v for k, v in source.items() if is_allowed(k)}
    if home is not None:
        hf_home = _hf_home(source)
        if hf_home is not None:
            env.setdefault("HF_HOME", hf_home)
        env["HOME"] = home
    elif "HOME" in source:
        env["HOME"] = source["HOME"]
    env.update(extra or {})
    return env

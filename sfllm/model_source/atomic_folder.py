"""Cache folders that appear complete or not at all, built by one process at a time."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cached_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, first built by `build(scratch)` in a scratch folder that is then renamed to it.

    The rename is atomic, so a crash mid-build leaves no `target` and an existing one is complete.
    The worker and the engine resolve the model at the same time; a lock file makes the second
    wait for the first one's build instead of repeating it.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            build(scratch)
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target

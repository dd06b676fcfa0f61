"""What uvicorn's worker processes of one `serve` share: folders made for the run before they
start, and whether another worker is still alive."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def fresh_folder_for_workers(variable: str, prefix: str) -> None:
    """Points the environment variable `variable` (which each worker reads as it starts) at a new
    folder, removed at exit. Called before uvicorn starts the workers."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[variable] = folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True

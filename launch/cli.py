"""What the programs of longnet.launch share: one error style, and checks of the paths they will
write, made before any work.

Bad input ends a program with one line on stderr, `error: <what is wrong, naming the value>`,
and exit status 2 (argparse's status for bad arguments); never with a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

BAD_INPUT = 2


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def fail(error: BaseException | str, show: bool = True) -> NoReturn:
    """Exit with status 2, printing `error: ...` (when `show`: one rank of several prints).

    In a torch.distributed group the group is destroyed and the process ends at once, without
    finalizing the interpreter. NOTE: gloo's worker threads drop the last collective's tensors
    on their own schedule; a tensor dropped during finalization takes the GIL from a C++ thread,
    which then aborts the process ('terminate called without an active exception', SIGABRT:
    about one refusal in 80 on a busy 2-core machine, torch 2.13) instead of exiting with 2.
    A program refuses before it writes anything, so nothing is left to flush but stdio."""
    if show:
        print(f"error: {one_line(error)}", file=sys.stderr)
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(BAD_INPUT)
    sys.exit(BAD_INPUT)


def _nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, name: str, path: Path) -> None:
    """ValueError unless `folder` can be created or written into, by actually trying: access()
    answers yes to root on a read-only filesystem."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"{name}={str(path)!r}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or error
        raise ValueError(f"{name}={str(path)!r}: cannot write in {existing} ({reason})") from None


def check_output_dir(path: Path, name: str) -> None:
    """ValueError unless `path` is a folder, or can become one, that this process can write."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a file, not a folder")
    _check_writable(path, name, path)


def check_output_file(path: Path, name: str) -> None:
    """ValueError unless `path` can be written as a file (it may exist: it is replaced)."""
    if path.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a folder: name a file to write")
    _check_writable(path.parent, name, path)

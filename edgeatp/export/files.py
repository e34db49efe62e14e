"""Writing files so that nothing the user has is lost and no folder holds a mix of two runs.

* :func:`atomic_write`: a file is written beside its target and renamed over it, so a reader
  (or a full disk, or Ctrl-C) never sees half a file and the previous version survives a failure.
* :class:`OutputSet`: the files of one run are built in a private temporary folder and moved into
  the output folder together at the end, under a lock; a manifest remembers which files the set
  holds, so files of an earlier run that this run does not write are removed instead of passing
  for this run's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import EdgeatpError, OptionError

MANIFEST = ".edgeatp-manifest.json"
LOCK = ".edgeatp.lock"


def _os_problem(exc: OSError, path: Path) -> EdgeatpError:
    """A one-line error for a file-system failure, naming the path."""
    if exc.errno == errno.ENOSPC:
        return EdgeatpError(f"{path}: the disk is full; free some space (nothing was changed)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgeatpError(f"{path}: permission denied; choose a folder you can write to")
    if exc.errno == errno.ENOTDIR:
        return EdgeatpError(f"{path}: a part of this path is a file, not a folder; choose another output folder")
    return EdgeatpError(f"{path}: {exc.strerror or exc}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _os_problem(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _os_problem(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: Path) -> None:
    """Fail at once, before any work, if ``folder`` cannot be created or written."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise EdgeatpError(f"{folder}: {probe} is a file, not a folder; choose another output folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EdgeatpError(f"{folder}: cannot write into {probe} (permission denied); choose another output folder")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder (other edgeatp runs into it wait)."""
    with open(folder / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class OutputSet:
    """The files of one run, staged privately and published together into ``folder``.

    Use as a context manager: write into :attr:`stage` (paths from :meth:`path`), then
    :meth:`publish`. Leaving the block without publishing (an error, Ctrl-C) leaves the output
    folder as it was. With ``overwrite=False`` only files that an earlier set of the same stem
    wrote may be replaced.
    """

    def __init__(self, folder: Path, stem: str, replace_set: bool = True, overwrite: bool = True) -> None:
        self.folder, self.stem = Path(folder), stem
        self.replace_set, self.overwrite = replace_set, overwrite
        self.stage: Path | None = None
        self.files: list[str] = []

    def __enter__(self) -> "OutputSet":
        check_writable(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.stem}.staging.", dir=self.folder))
        except OSError as exc:
            raise _os_problem(exc, self.folder) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` of the set (in the private staging folder)."""
        assert self.stage is not None, "use OutputSet as a context manager"
        if name not in self.files:
            self.files.append(name)
        return self.stage / name

    def publish(self) -> dict[str, Path]:
        """Move the staged files into the output folder together; returns name → final path."""
        assert self.stage is not None
        written = [n for n in self.files if (self.stage / n).exists()]
        try:
            with _locked(self.folder):
                manifest = self._manifest()
                if not self.overwrite:
                    ours = set(manifest.get(self.stem, []))
                    clash = [n for n in written if (self.folder / n).exists() and n not in ours]
                    if clash:
                        raise OptionError(f"{self.folder / clash[0]} already exists and was not written by edgeatp "
                                          "for this circuit; choose another folder ({out_dir}) or allow "
                                          "overwriting ({overwrite})", out_dir="out_dir", overwrite="overwrite")
                previous = manifest.get(self.stem, []) if self.replace_set else []
                for name in previous:
                    if name not in written:
                        (self.folder / name).unlink(missing_ok=True)
                for name in written:
                    os.replace(self.stage / name, self.folder / name)
                kept = written if self.replace_set else sorted(set(manifest.get(self.stem, [])) | set(written))
                manifest[self.stem] = kept
                atomic_write(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        except OSError as exc:
            raise _os_problem(exc, self.folder) from None
        return {n: self.folder / n for n in written}

    def _manifest(self) -> dict[str, list[str]]:
        try:
            data = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def set_files(folder: Path, stem: str) -> list[str]:
    """The files the last published set of ``stem`` in ``folder`` holds (empty if unknown)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = data.get(stem, []) if isinstance(data, dict) else []
    return [f for f in files if isinstance(f, str)]

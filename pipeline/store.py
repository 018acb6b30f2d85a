"""Where stage outputs live: `<root>/<stage>/<cache key>/`, root a folder or a pyarrow.fs URI.

A stage writes into a scratch folder; publishing moves it into place and writes `_SUCCESS`
last, so a half-written output is never a cache hit.

The scratch folder of a running stage is stable, `<root>/<stage>/.<key>.partial/` (for a
remote store, the same under the local temp folder), so a stage killed half-way (kill -9, a
dead Ray worker) leaves its checkpoint where the next attempt at the same key finds it. It is
guarded by an exclusive file lock (`.<key>.lock`, fcntl.flock, released by the kernel when
the holder dies): two runs at once never write the same folder; the second waits, then finds
the first's published output (see `claim`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.constants import is_remote

SUCCESS = "_SUCCESS"
RESULT = "result.json"


class ArtifactStore:
    def __init__(self, location: str):
        self.location = location
        if is_remote(location):
            self.fs, self.root = pafs.FileSystem.from_uri(location)
            self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, self.root, self.is_local = pafs.LocalFileSystem(), str(Path(location).resolve()), True
        self.root = self.root.rstrip("/")

    def path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def is_finished(self, stage: str, key: str) -> bool:
        info = self.fs.get_file_info(f"{self.path(stage, key)}/{SUCCESS}")
        return info.type != pafs.FileType.NotFound

    def read_result(self, stage: str, key: str) -> dict:
        with self.fs.open_input_stream(f"{self.path(stage, key)}/{RESULT}") as f:
            return json.loads(f.read())

    def scratch_dir(self, stage: str, key: str) -> Path:
        """A fresh, private, empty local folder for a stage to write into (on the same disk
        when local). For a stage that may resume, use `claim` instead."""
        if self.is_local:
            scratch = Path(self.root) / stage / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            scratch.mkdir(parents=True)
            return scratch
        return Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-"))

    def partial_dir(self, stage: str, key: str) -> Path:
        """The stable scratch folder of (stage, key): what a killed attempt left is found here."""
        base = Path(self.root) if self.is_local else Path(tempfile.gettempdir()) / "minbert-pipeline-partial"
        return base / stage / f".{key}.partial"

    def claim(self, stage: str, key: str) -> StageLock:
        """Wait for the exclusive lock of (stage, key); the lock's `scratch` is partial_dir.

        Holding it, a caller first checks `is_finished` (a concurrent run may have published
        while it waited), then runs the stage in `scratch` and publishes, then releases.
        """
        return StageLock(self.partial_dir(stage, key))

    def publish(self, stage: str, key: str, scratch: Path, result: dict, replace: bool = False) -> None:
        """Move a finished scratch folder into place, with its result, atomically.

        A finished output already there is kept (another run published the same key first)
        unless `replace` (a forced re-run), which swaps the new one in.
        """
        (scratch / RESULT).write_text(json.dumps(result, indent=2, default=str))
        final = self.path(stage, key)
        if self.is_local:
            (scratch / SUCCESS).write_text("")
            try:
                Path(scratch).rename(final)
            except OSError:  # the key's folder exists: another run's output or a dead run's leftovers
                if replace or not self.is_finished(stage, key):
                    old = Path(final).with_name(f".{key}.old-{uuid.uuid4().hex[:8]}")
                    Path(final).rename(old)
                    Path(scratch).rename(final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    shutil.rmtree(scratch, ignore_errors=True)
            return
        if replace and self.is_finished(stage, key):
            self.fs.delete_file(f"{final}/{SUCCESS}")
        pafs.copy_files(str(scratch), final, destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{final}/{SUCCESS}") as f:
            f.write(b"")
        shutil.rmtree(scratch, ignore_errors=True)

    def local_dir(self, stage: str, key: str, cache: Path | None = None) -> Path:
        """A local folder holding the stage's output (downloaded once for remote stores)."""
        if self.is_local:
            return Path(self.path(stage, key))
        cache = cache or Path(tempfile.gettempdir()) / "minbert-pipeline-cache"
        target = cache / stage / key
        if not (target / SUCCESS).exists():
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self.path(stage, key), str(target), source_filesystem=self.fs)
        return target

    def discard(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)


class StageLock:
    """An exclusive flock on `<scratch>.lock` (`.<key>.lock` beside `.<key>.partial/`).

    The kernel drops the lock when its holder dies, so a kill -9 never leaves a stale lock.
    The holder deletes the lock file before releasing it; a waiter that then wins the lock on
    the deleted file sees the path no longer names its file and locks the new one instead.
    """

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self.path = self.scratch.with_name(self.scratch.name.removesuffix(".partial") + ".lock")
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # who holds it: for a person, or a test
                self._fd = fd
                return True
            os.close(fd)  # the holder before us deleted this file: lock the current one

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

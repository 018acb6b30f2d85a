"""Where stage outputs live: `<root>/<stage>/<cache key>/`, root a folder or a pyarrow.fs URI.

A stage writes into a scratch folder; publishing moves it into place and writes `_SUCCESS`
last, so a half-written output is never a cache hit. Publishing also writes `_MANIFEST.json`,
every file's size and sha256: a cache hit checks the sizes, and the hashes too where hashing
costs at most HASH_SHARE of the stage's own run time (measured when published), so a file
damaged or deleted on disk later is found before it is handed out (`damaged`).

The scratch folder of a running stage is stable, `<root>/<stage>/.<key>.partial/` (for a
remote store, the same under the local temp folder), so a stage killed half-way (kill -9, a
dead Ray worker) leaves its checkpoint where the next attempt at the same key finds it. It is
guarded by an exclusive file lock (`.<key>.lock`, fcntl.flock, released by the kernel when
the holder dies): two runs at once never write the same folder; the second waits, then finds
the first's published output (see `claim`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.constants import is_remote

SUCCESS = "_SUCCESS"
RESULT = "result.json"
MANIFEST = "_MANIFEST.json"
HASH_SHARE = 0.02  # hashes are checked on a cache hit when hashing took at most this share of the stage's run


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
        write_manifest(Path(scratch), result.get("seconds"))
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

    def damaged(self, stage: str, key: str) -> str | None:
        """None when the finished output is as it was published (or predates manifests); else
        one line naming the first file that is missing, of another size or (local stores, where
        the manifest says hashing is cheap) of other content."""
        base = self.path(stage, key)
        try:
            with self.fs.open_input_stream(f"{base}/{MANIFEST}") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return f"{base}/{MANIFEST}: unreadable ({type(e).__name__}: {e})"
        for rel, entry in manifest["files"].items():
            info = self.fs.get_file_info(f"{base}/{rel}")
            size = None if info.type == pafs.FileType.NotFound else info.size
            damage = _size_damage(f"{base}/{rel}", size, entry)
            if damage:
                return damage
        if self.is_local and manifest.get("check_hashes"):
            for rel, entry in manifest["files"].items():
                if file_sha256(Path(base) / rel) != entry["sha256"]:
                    return f"{base}/{rel}: {CHANGED}"
        return None

    def discard(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)


def write_manifest(folder: Path, stage_seconds: float | None) -> None:
    """`folder/_MANIFEST.json`: each file's size and sha256, how long hashing took, and whether
    a cache hit should check the hashes (hashing at most HASH_SHARE of the stage's seconds)."""
    start = time.perf_counter()
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (SUCCESS, MANIFEST):
            files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    seconds = time.perf_counter() - start
    check = stage_seconds is None or seconds <= HASH_SHARE * stage_seconds
    (folder / MANIFEST).write_text(json.dumps({"files": files, "hash_seconds": round(seconds, 4),
                                               "check_hashes": check}, indent=1))


def damaged_folder(folder: Path) -> str | None:
    """`damaged` for a folder inside a published local output (a model folder handed to predict
    or leaderboard): the manifest of the output it is in, checked for the files under it, sizes
    and hashes. None when it is intact or is in no published output."""
    folder = Path(folder).resolve()
    for root in (folder, *folder.parents[:2]):
        if (root / MANIFEST).is_file():
            break
    else:
        return None
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{root / MANIFEST}: unreadable ({type(e).__name__}: {e})"
    inside = folder.relative_to(root)
    for rel, entry in files.items():
        path = root / rel
        if inside != Path(".") and inside not in Path(rel).parents:
            continue
        damage = _size_damage(str(path), path.stat().st_size if path.is_file() else None, entry)
        if damage or file_sha256(path) != entry["sha256"]:
            return damage or f"{path}: {CHANGED}"
    return None


CHANGED = "its content changed after it was published (sha256 differs)"


def _size_damage(path: str, size: int | None, entry: dict) -> str | None:
    """What is wrong with a file of `size` bytes (None: missing) against its manifest entry, if anything."""
    if size is None:
        return f"{path}: missing (published with {entry['size']} bytes)"
    if size != entry["size"]:
        return f"{path}: {size} bytes, published with {entry['size']}"
    return None


class DiskFull(OSError):
    """A stage (or the driver) ran out of disk: the one line says where and how much is free."""


LOW_SPACE = 1 << 20  # below this many free bytes, a write error without errno (torch's own writer) is the disk


def disk_full(error: BaseException, writing: Path) -> DiskFull | None:
    """A DiskFull naming the filesystem, the file being written and the free space, when
    `error` (or what caused it) is ENOSPC, or is an OSError/RuntimeError with the disk under
    `writing` all but full (torch's checkpoint writer reports "unexpected pos" without errno)."""
    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    enospc = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
    existing = Path(writing)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if not enospc and not (isinstance(error, (OSError, RuntimeError)) and free < LOW_SPACE):
        return None
    path = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None) or _newest_file(writing)
    how = "" if enospc else f"; the error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return DiskFull(f"no space left on {_filesystem(existing)} writing {path} ({_bytes(free)} free){how}")


def _newest_file(folder: Path) -> Path:
    """The file last written under `folder` (the half-written one), else the folder."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else Path(folder)


def _filesystem(path: Path) -> str:
    """The mount point holding `path`, with its type from /proc/mounts: e.g. "/mnt/scratch (tmpfs)"."""
    mount = Path(path).resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    try:
        types = {fields[1]: fields[2] for fields in (line.split() for line in open("/proc/mounts")) if len(fields) > 2}
    except OSError:
        types = {}
    return f"{mount} ({types[str(mount)]})" if str(mount) in types else str(mount)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_SHA256: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[memo] = h.hexdigest()
    return _SHA256[memo]


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

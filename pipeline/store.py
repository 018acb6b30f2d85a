"""Where stage outputs live: `<root>/<stage>/<cache key>/`, root a folder or a pyarrow.fs URI.

A stage writes into a private scratch folder; publishing moves it into place and writes
`_SUCCESS` last, so a half-written output is never a cache hit and two runs computing the
same stage at once never mix their files (the first to finish wins, the other's copy is
discarded).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"
RESULT = "result.json"


class ArtifactStore:
    def __init__(self, location: str):
        self.location = location
        if "://" in location:
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
        """An empty local folder for a stage to write into (on the same disk when local)."""
        if self.is_local:
            scratch = Path(self.root) / stage / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            scratch.mkdir(parents=True)
            return scratch
        return Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-"))

    def publish(self, stage: str, key: str, scratch: Path, result: dict) -> None:
        """Move a finished scratch folder into place, with its result, atomically."""
        (scratch / RESULT).write_text(json.dumps(result, indent=2, default=str))
        final = self.path(stage, key)
        if self.is_local:
            (scratch / SUCCESS).write_text("")
            try:
                Path(scratch).rename(final)
            except OSError:  # another run published the same key first: keep theirs
                if not self.is_finished(stage, key):
                    shutil.rmtree(final, ignore_errors=True)  # a dead run's leftovers
                    Path(scratch).rename(final)
                else:
                    shutil.rmtree(scratch, ignore_errors=True)
            return
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

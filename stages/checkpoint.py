"""Training checkpoints: what finetune and mlm_pretrain need to continue a killed run exactly.

A stage keeps one checkpoint, `out/checkpoint/state.pt`, rewritten every
`checkpoint_every` steps and at each epoch end. It is written to a temp file and renamed
(os.replace), so a kill -9 mid-write leaves the previous checkpoint whole. The driver hands a
re-run of the same cache key the same `out` folder, so "resume" is simply: `out` already holds
a checkpoint made with this same configuration (its fingerprint matches). A finished stage
deletes its checkpoint (`remove`), so published outputs carry no optimizer state.

Besides the model, optimizer and schedule, a checkpoint holds the random state: torch's
(dropout; CUDA's too when present) and the numpy generator's bit_generator.state, so every
step after a resume draws what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

DIR = "checkpoint"
FILE = "state.pt"


def fingerprint(*parts) -> str:
    """A short hash of what must be equal for a checkpoint to be resumable (config, data)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save(out: Path, state: dict) -> Path:
    """Write `state` to out/checkpoint/state.pt atomically (temp file in the same folder, then rename)."""
    folder = Path(out) / DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    tmp = folder / f".{FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(out: Path, expected_fingerprint: str, log_name: str) -> dict | None:
    """The checkpoint in `out` if there is one made with the same fingerprint, else None."""
    path = Path(out) / DIR / FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start over
        print(f"{log_name}: ignoring unreadable checkpoint {path} ({type(e).__name__}: {e}); starting over")
        return None
    if state.get("fingerprint") != expected_fingerprint:
        print(f"{log_name}: ignoring checkpoint {path}: made with a different config or data; starting over")
        return None
    return state


def remove(out: Path) -> None:
    shutil.rmtree(Path(out) / DIR, ignore_errors=True)


def rng_state(numpy_generators: dict[str, np.random.Generator] = None,
              torch_generators: dict[str, torch.Generator] = None) -> dict:
    """torch's global RNG (and CUDA's), plus the named numpy and torch generators' states."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {k: g.bit_generator.state for k, g in (numpy_generators or {}).items()},
            "torch_generators": {k: g.get_state() for k, g in (torch_generators or {}).items()}}


def restore_rng(saved: dict, numpy_generators: dict[str, np.random.Generator] = None,
                torch_generators: dict[str, torch.Generator] = None) -> None:
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    for k, g in (numpy_generators or {}).items():
        g.bit_generator.state = saved["numpy"][k]
    for k, g in (torch_generators or {}).items():
        g.set_state(saved["torch_generators"][k])

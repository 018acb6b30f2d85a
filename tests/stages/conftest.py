"""Fixtures for the stage tests: one torch thread, and the real data prepared once."""

import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import data_prep

# The data every stage test trains on: 48 rows per split of the real CS224N files, 32 tokens.
PREPARED_DATA = {"data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop"}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core machine the second
    thread spin-waits for a core; one thread keeps these tests at a few seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, shared_data_dir, tiny_model_dir):
    """data_prep's output folder for PREPARED_DATA with the tiny model's tokenizer."""
    cfg = apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(shared_data_dir), "model.dir": str(tiny_model_dir), **PREPARED_DATA})
    out = tmp_path_factory.mktemp("data_prep")
    data_prep.run(cfg, {}, out, lambda *a, **k: None)
    return out

"""The conformance suite's session store (one normal model per family, one checkpoint per (family, layout)) and
its thread setting."""

from __future__ import annotations

import pytest
import torch

from ._cases import CaseStore


@pytest.fixture(scope="package", autouse=True)
def _one_intra_op_thread():
    """Tiny models gain nothing from intra-op parallelism, and OpenMP workers that spin while the expert cache's
    I/O threads (or another process) hold the cores make each forward up to 100x slower: one thread, restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    store = CaseStore(str(tmp_path_factory.mktemp("conformance")))
    yield store
    store.close()

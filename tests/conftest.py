"""Shared fixtures: tiny MoE checkpoints written once per session, both layouts."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

import hf_moe_offload  # noqa: E402,F401  (installs the hooks, as a user's import does)
from hf_moe_offload.testing import build_tiny, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def mixtral_model():
    return build_tiny("mixtral")


@pytest.fixture(scope="session", params=["per_expert", "fused"])
def mixtral_ckpt(request, tmp_path_factory, mixtral_model):
    """(model, folder) with the Mixtral checkpoint in each layout."""
    folder = tmp_path_factory.mktemp(f"mixtral_{request.param}")
    return mixtral_model, save_checkpoint(mixtral_model, str(folder), request.param)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, mixtral_model):
    return save_checkpoint(mixtral_model, str(tmp_path_factory.mktemp("mixtral_fused")), "fused")

"""`OffloadConfig.threads`: torch's intra-op threads sized to the cores other processes leave free (measured with
real busy processes), a fixed count, and the user's own choice (OMP_NUM_THREADS, torch.set_num_threads) kept."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload import OffloadConfig
from hf_moe_offload.errors import OffloadConfigError
from hf_moe_offload.integration import threads as threads_mod
from hf_moe_offload.integration.threads import ThreadSizer, busy_cores_of_others, usable_cores


@pytest.fixture(autouse=True)
def torch_threads_restored(monkeypatch):
    """Each test starts as a fresh process would: torch at its default count, no user choice recorded."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads_mod, "_last_set", None)
    torch.set_num_threads(usable_cores())
    yield
    torch.set_num_threads(before)


@pytest.fixture
def busy_cores():
    """One process spinning on every usable core, already running for a while."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores())]
    time.sleep(0.5)
    yield len(procs)
    for p in procs:
        p.kill()
        p.wait()


def test_this_process_own_running_threads_are_not_counted_as_others(busy_cores):
    assert threads_mod._own_running() >= 1  # the thread that looks is running
    assert busy_cores_of_others() >= busy_cores - 0.5  # every spinner seen, whatever this process does


def test_auto_gives_one_thread_when_other_processes_keep_every_core_busy(busy_cores, caplog):
    with caplog.at_level(logging.INFO, logger="hf_moe_offload"):
        n = ThreadSizer("auto").apply()
    assert n == 1 == torch.get_num_threads()
    assert any("threads of other processes runnable" in r.getMessage() for r in caplog.records), caplog.text


def test_auto_follows_the_load_from_one_call_to_the_next(busy_cores):
    sizer = ThreadSizer("auto")
    assert sizer.apply() == 1
    assert sizer.last_decision["threads"] == 1 and "usable cores" in sizer.last_decision["why"]


def test_a_fixed_count_is_applied():
    assert ThreadSizer(1).apply() == 1 == torch.get_num_threads()


def test_omp_num_threads_is_the_users_choice(monkeypatch, busy_cores):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    sizer = ThreadSizer("auto")
    assert sizer.apply() == 2 == torch.get_num_threads()
    assert "OMP_NUM_THREADS=2" in sizer.last_decision["why"]


def test_a_set_num_threads_call_after_ours_is_kept(busy_cores):
    sizer = ThreadSizer("auto")
    assert sizer.apply() == 1
    torch.set_num_threads(3)
    assert sizer.apply() == 3 == torch.get_num_threads()
    assert "torch.set_num_threads(3) was called" in sizer.last_decision["why"]


@pytest.mark.parametrize("bad", [0, -1, 2000, "many", 1.5, True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(OffloadConfigError, match="threads: expected 'auto' or an int"):
        OffloadConfig(threads=bad)


def test_a_digit_string_is_a_count():
    assert OffloadConfig(threads="2").threads == 2


def test_a_loaded_model_applies_its_threads_at_load_and_at_each_generate():
    model = AutoModelForCausalLM.from_pretrained("models/moe-tiny", offload_config={"host_budget": "25%", "threads": 1})
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert torch.get_num_threads() == 1
    assert model.offload_stats()["threads"] == 1

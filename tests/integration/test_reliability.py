"""Reliability: faults inside I/O threads, checkpoint files changed under a loaded model, concurrent callers, a soak.

Faults are injected into real I/O threads reading real files, by replacing `reader._readinto` (the `pread`
wrapper). Each fault must end in a typed error in the calling thread, or in output equal to the model without
offloading; never in wrong tokens, a hang, a leaked slot, thread or file descriptor. docs/reliability.md tabulates
what each test here establishes.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from hf_moe_offload import (
    BudgetTooSmallError,
    CheckpointChangedError,
    CorruptCheckpointError,
    ExpertLoadError,
    ExpertLoadTimeoutError,
    MissingShardError,
    OffloadConfigError,
    OffloadError,
)
from hf_moe_offload.integration.plan import CORRELATION_FILE
from hf_moe_offload.storage import reader
from hf_moe_offload.testing import save_checkpoint

PROMPT = torch.tensor([[5, 6, 7]])
NEW_TOKENS = 8


def _load(folder: str, **cfg):
    cfg = {"host_budget": "30%", "prefetch": "none", "device": "cpu", **cfg}
    return AutoModelForCausalLM.from_pretrained(folder, offload_config=cfg)


def _greedy(model, prompt=PROMPT, n=NEW_TOKENS, **kwargs) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


@pytest.fixture
def folder(tmp_path, mixtral_model) -> str:
    """A checkpoint of its own, which a test may damage."""
    return save_checkpoint(mixtral_model, str(tmp_path / "ckpt"), "fused")


@pytest.fixture(scope="module")
def reference(mixtral_model) -> torch.Tensor:
    return _greedy(mixtral_model)


def _settle(cache, seconds: float = 10.0) -> None:
    """Wait for the loads still running on I/O threads (a failed layer leaves its other loads in flight)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with cache._lock:
            futures = [e.future for e in cache.compute.entries.values()]
            free, held = cache.compute.pool.num_free, len(cache.compute.entries)
        if all(f.done() for f in futures) and free + held == cache.compute.pool.n_slots:
            return
        wait(futures, timeout=0.05)
    raise AssertionError("loads did not settle")


def _assert_consistent(cache) -> None:
    """Every slot is free or held by exactly one loaded, unpinned expert; no failed entry stays."""
    _settle(cache)
    with cache._lock:
        pool, entries = cache.compute.pool, list(cache.compute.entries.values())
        slots = sorted(pool._free + [e.slot for e in entries])
        assert slots == list(range(pool.n_slots)), f"slots lost or shared: {slots}"
        assert all(e.pins == 0 for e in entries), "a lease was not released"
        assert all(e.future.exception() is None for e in entries), "a failed load stayed in the cache"


def _flaky_read(fault: str, times: int = 1):
    """A `_readinto` that fails its first `times` calls with `fault` ("eio" or "short"), then reads."""
    real, left, lock = reader._readinto, [times], threading.Lock()

    def readinto(fd, buf, offset):
        with lock:
            fail = left[0] > 0
            left[0] -= fail
        if not fail:
            return real(fd, buf, offset)
        if fault == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buf[: len(buf) // 2], offset)

    return readinto


# -- errors inside I/O threads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault, message", [("eio", "Input/output error"), ("short", "short read")])
def test_read_fault_is_typed_then_the_expert_loads_again(folder, reference, monkeypatch, fault, message):
    model = _load(folder)
    monkeypatch.setattr(reader, "_readinto", _flaky_read(fault))
    with pytest.raises(ExpertLoadError, match=message) as info:
        _greedy(model)
    assert folder in str(info.value) and "expert" in str(info.value)
    if fault == "eio":
        assert info.value.__cause__.errno == errno.EIO
    cache = model.offload_engine.cache
    _assert_consistent(cache)
    assert model.offload_stats()["load_errors"] == 1
    assert torch.equal(_greedy(model), reference), "the expert that failed was not read again correctly"
    _assert_consistent(cache)


@pytest.mark.parametrize("io_threads", [1, 2])
def test_stuck_read_raises_a_timeout_not_a_hang(folder, reference, monkeypatch, io_threads):
    model = _load(folder, io_threads=io_threads)
    cache = model.offload_engine.cache
    cache.load_timeout = 0.5
    real, stuck, release = reader._readinto, threading.Event(), threading.Event()

    def hanging(fd, buf, offset):
        if not stuck.is_set():
            stuck.set()
            release.wait(30)  # a pread that does not return until the test lets it
        return real(fd, buf, offset)

    monkeypatch.setattr(reader, "_readinto", hanging)
    outcome = []

    def run():
        try:
            outcome.append(_greedy(model))
        except Exception as e:  # noqa: BLE001 - inspected below
            outcome.append(e)

    caller = threading.Thread(target=run)
    t0 = time.monotonic()
    caller.start()
    caller.join(10)
    elapsed = time.monotonic() - t0
    assert not caller.is_alive(), "generate hung on a stuck read"
    assert isinstance(outcome[0], ExpertLoadTimeoutError), outcome
    assert "load_timeout=0.5s" in str(outcome[0]) and elapsed < 5
    assert cache.compute.pool.num_free + len(cache.compute.entries) < cache.compute.pool.n_slots, (
        "the stuck read's slot was handed out while the read may still write into it"
    )
    release.set()  # the read returns: its slot comes back, and the expert can be loaded again
    _assert_consistent(cache)
    assert torch.equal(_greedy(model), reference)


def test_waiting_for_a_slot_is_bounded_by_load_timeout(mixtral_dir):
    model = _load(mixtral_dir)
    cache = model.offload_engine.cache
    cache.load_timeout = 0.3
    held = [cache.try_acquire((0, e)) for e in range(cache.capacity)]  # every slot pinned, never released
    for lease in held:
        lease.wait()
    t0 = time.monotonic()
    with pytest.raises(ExpertLoadTimeoutError, match="no cache slot freed within 0.3s"):
        cache.acquire((1, 0))
    assert time.monotonic() - t0 < 3
    for lease in held:
        lease.release()
    _assert_consistent(cache)
    with pytest.raises(ValueError, match="load_timeout"):
        cache.load_timeout = 0


# -- checkpoint files changed after the load ----------------------------------------------------------------------


def _data_start(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _replace(path: str) -> None:
    """Write a copy whose tensor bytes are all 1s, then rename it over the file (a new inode)."""
    start, size = _data_start(path), os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(start)
    with open(path + ".new", "wb") as f:
        f.write(head + b"\x01" * (size - start))
    os.replace(path + ".new", path)


def _zero(path: str) -> None:
    """Overwrite every tensor byte with zeros in place: same inode, same size."""
    start, size = _data_start(path), os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * (size - start))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "replaced": (_replace, "was replaced by another file"),
    "zeroed": (_zero, "was modified in place"),
    "truncated": (_truncate, "was truncated"),
    "deleted": (os.remove, "was deleted"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_changed_checkpoint_raises_at_next_generate(folder, reference, damage):
    model = _load(folder)
    assert torch.equal(_greedy(model), reference)
    ids = torch.arange(0, 96).reshape(2, 48)  # routes to every expert: a forward must read some
    want = model(ids).logits
    path = os.path.join(folder, "model.safetensors")
    # the mtime clock ticks coarsely (a few ms): let it move, as it has for any real edit after a load
    time.sleep(0.02)
    change, what = DAMAGE[damage]
    change(path)
    with pytest.raises(CheckpointChangedError, match=what) as info:
        _greedy(model)
    assert path in str(info.value) and "load the model again" in str(info.value)
    _assert_consistent(model.offload_engine.cache)
    if damage == "truncated":
        return  # a bare forward would touch non-expert weights mmapped past the new end: SIGBUS, see the docs
    # A bare forward (no generate, so no check up front) reads missing experts: the read of a file written in place
    # raises; a file renamed over or deleted is still open, and its old bytes are read. Never wrong logits.
    try:
        got = model(ids).logits
    except CheckpointChangedError as e:
        assert damage == "zeroed", e
    else:
        assert damage in ("replaced", "deleted") and torch.equal(got, want)
    _assert_consistent(model.offload_engine.cache)


# -- concurrency --------------------------------------------------------------------------------------------------


def test_four_threads_generate_what_sequential_greedy_generates(mixtral_dir):
    model = _load(mixtral_dir, host_budget="30%", prefetch="gate_lookahead", io_threads=2)
    prompts = [torch.tensor([[3 + i, 40 + 7 * i, 90 - i, 11 * i]]) for i in range(4)]
    sequential = [_greedy(model, p, n=16) for p in prompts]
    results: dict[int, object] = {}

    def caller(i: int) -> None:
        try:
            results[i] = [_greedy(model, prompts[i], n=16) for _ in range(2)]
        except Exception as e:  # noqa: BLE001 - inspected below
            results[i] = e

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a concurrent generate hung"
    for i in range(4):
        assert not isinstance(results[i], Exception), results[i]
        assert all(torch.equal(out, sequential[i]) for out in results[i]), f"caller {i} got other tokens"
    _assert_consistent(model.offload_engine.cache)


def test_two_models_alive_at_once_keep_their_own_state(mixtral_dir, reference):
    a, b = _load(mixtral_dir), _load(mixtral_dir, host_budget="50%")
    assert a.offload_engine.cache is not b.offload_engine.cache
    assert torch.equal(_greedy(a), reference)
    assert b.offload_stats()["misses"] == 0 and a.offload_stats()["misses"] > 0
    before = a.offload_stats()
    assert torch.equal(_greedy(b), reference)
    after = a.offload_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    a.offload_engine.close()
    assert torch.equal(_greedy(b), reference), "closing one model disturbed the other"


# -- soak ----------------------------------------------------------------------------------------------------------


class _Probe(LogitsProcessor):
    """Checked at every decode step: the cache's memory, the process's threads and file descriptors."""

    def __init__(self, cache, budget: int):
        self.cache, self.budget, self.steps = cache, budget, 0
        self.max_bytes, self.threads, self.fds = 0, set(), set()

    def __call__(self, input_ids, scores):
        self.steps += 1
        self.max_bytes = max(self.max_bytes, self.cache.host.pool.allocated_bytes)
        self.threads.add(threading.active_count())
        self.fds.add(len(os.listdir("/proc/self/fd")))
        return scores


@pytest.mark.slow
def test_soak_1000_decode_steps_within_budget(mixtral_dir, mixtral_model):
    gc.collect()  # models dropped by earlier tests close (and stop their threads) now, not during the soak
    model = _load(mixtral_dir, host_budget="20%", prefetch="gate_lookahead")
    engine = model.offload_engine
    budget = engine.config.host_budget.resolve(engine.topology.total_expert_nbytes)
    probe = _Probe(engine.cache, budget)
    for i in range(9):
        prompt = torch.tensor([[i, 2 * i + 1, 100 - i]])
        out = _greedy(model, prompt, n=112, logits_processor=LogitsProcessorList([probe]))
        if i in (0, 8):
            assert torch.equal(out, _greedy(mixtral_model, prompt, n=112)), f"call {i} diverged"
    assert probe.steps >= 1000
    assert 0 < probe.max_bytes <= budget
    assert len(probe.threads) == 1, f"thread count moved: {sorted(probe.threads)}"
    assert len(probe.fds) == 1, f"open file descriptors moved: {sorted(probe.fds)}"
    stats = model.offload_stats()
    assert stats["evictions"] > 100 and stats["load_errors"] == 0
    _assert_consistent(engine.cache)


# -- failing loads leave nothing behind ---------------------------------------------------------------------------


def _shards(folder: str) -> list[str]:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]


def _corrupt_header(folder: str) -> None:
    with open(_shards(folder)[0], "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))  # a header longer than the file


def _drop_shard(folder: str) -> None:
    os.remove(_shards(folder)[-1])


def _bad_correlation(folder: str) -> None:
    np.savez_compressed(os.path.join(folder, CORRELATION_FILE), np.zeros((3, 3)))


FAILING_LOADS = {
    "bad config": (None, {"io_threads": 0}, OffloadConfigError),
    "bad budget": (None, {"host_budget": "1KB"}, BudgetTooSmallError),
    "corrupt header": (_corrupt_header, {}, CorruptCheckpointError),
    "missing shard": (_drop_shard, {}, MissingShardError),
    "corrupt correlation table": (_bad_correlation, {"prefetch": "correlation"}, CorruptCheckpointError),
}


def _process_state() -> tuple[set, set]:
    gc.collect()
    return set(threading.enumerate()), set(os.listdir("/proc/self/fd"))


def test_failing_loads_leave_no_thread_and_no_open_file(tmp_path, mixtral_model):
    base = save_checkpoint(mixtral_model, str(tmp_path / "base"), "fused", shards=2)
    _process_state()
    for case, (damage, cfg, error) in FAILING_LOADS.items():
        folder = str(tmp_path / case.replace(" ", "_"))
        shutil.copytree(base, folder)
        if damage is not None:
            damage(folder)
        threads, fds = _process_state()
        with pytest.raises(error) as info:
            _load(folder, **cfg)
        assert isinstance(info.value, OffloadError), case
        del info
        after_threads, after_fds = _process_state()
        assert after_threads <= threads, f"{case}: threads left behind: {after_threads - threads}"
        assert after_fds <= fds, f"{case}: file descriptors left open: {after_fds - fds}"

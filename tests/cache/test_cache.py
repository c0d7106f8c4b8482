"""The shared cache: budgets in slots, pinned experts never evicted, policies, concurrency."""

import threading

import pytest
import torch

from hf_moe_offload import UnknownNameError, register_policy
from hf_moe_offload.cache import ExpertCache, LFUPolicy, LRUPolicy, OffloadStats, make_policy
from hf_moe_offload.integration import inspect_checkpoint
from hf_moe_offload.storage import ExpertStore


def _cache(model, folder, slots, policy="lru", threads=2):
    _, layout, _ = inspect_checkpoint(model, folder)
    stats = OffloadStats()
    cache = ExpertCache(
        ExpertStore(layout),
        device=torch.device("cpu"),
        host_slots=slots,
        device_slots=0,
        policy_factory=lambda: make_policy(policy),
        io_threads=threads,
        stats=stats,
    )
    return cache, stats, layout


def test_lru_and_lfu_order():
    lru = LRUPolicy()
    for k in "abc":
        lru.on_insert(k)
    lru.on_access("a")
    assert lru.choose_victim("abc") == "b"
    assert lru.choose_victim("ac") == "c"
    lfu = LFUPolicy()
    for k in "abc":
        lfu.on_insert(k)
    for k in "aab":
        lfu.on_access(k)
    assert lfu.choose_victim("abc") == "c"
    assert lfu.choose_victim("ab") == "b"


def test_policy_registry_rejects_duplicates_and_lists_names():
    with pytest.raises(ValueError, match="already registered"):
        register_policy("lru")(LRUPolicy)
    with pytest.raises(UnknownNameError, match="lfu, lru"):
        make_policy("fifo")


def test_capacity_is_never_exceeded_and_pinned_experts_stay(mixtral_dir, mixtral_model):
    cache, stats, layout = _cache(mixtral_model, mixtral_dir, slots=3)
    held = cache.try_acquire((0, 0))
    held.wait()
    for e in range(1, 8):  # churn through every other expert of layer 0
        lease = cache.try_acquire((0, e))
        assert lease is not None
        lease.wait()
        lease.release()
        assert (0, 0) in cache.resident()
        assert len(cache.resident()) <= 3
    assert cache.host.pool.allocated_bytes <= 3 * layout.slot_nbytes
    s = stats.snapshot()
    assert s["misses"] == 8 and s["evictions"] == 5
    again = cache.acquire_resident((0, 0))
    assert again is not None and again.hit
    again.release()
    held.release()
    cache.close()


def test_no_slot_when_all_pinned(mixtral_dir, mixtral_model):
    cache, _, _ = _cache(mixtral_model, mixtral_dir, slots=2)
    a, b = cache.try_acquire((0, 0)), cache.try_acquire((0, 1))
    a.wait(), b.wait()
    assert cache.try_acquire((0, 2)) is None
    b.release()
    c = cache.try_acquire((0, 2))
    assert c is not None
    c.wait()
    for lease in (a, c):
        lease.release()
    cache.close()


def test_blocking_acquire_waits_for_release_from_another_thread(mixtral_dir, mixtral_model):
    cache, _, _ = _cache(mixtral_model, mixtral_dir, slots=2)
    a, b = cache.try_acquire((1, 0)), cache.try_acquire((1, 1))
    a.wait(), b.wait()
    threading.Timer(0.2, a.release).start()
    c = cache.acquire((1, 2), timeout=10)
    c.wait()
    assert (1, 0) not in cache.resident()
    b.release(), c.release()
    cache.close()


def test_failed_load_frees_its_slot_and_reraises(mixtral_dir, mixtral_model):
    cache, stats, _ = _cache(mixtral_model, mixtral_dir, slots=2)
    cache.store.close()  # every read now fails
    lease = cache.try_acquire((0, 4))
    with pytest.raises(RuntimeError, match="closed"):
        lease.wait()
    lease.release()
    assert stats.snapshot()["load_errors"] == 1
    assert cache.host.pool.num_free == 2


def test_is_resident_agrees_with_resident(mixtral_dir, mixtral_model):
    cache, _, _ = _cache(mixtral_model, mixtral_dir, slots=2)
    assert not cache.is_resident((0, 0))
    for e in range(3):  # the third load evicts (0, 0), the least recently used
        lease = cache.try_acquire((0, e))
        lease.wait()
        lease.release()
    keys = [(0, e) for e in range(4)] + [(1, 0)]
    assert [cache.is_resident(k) for k in keys] == [k in cache.resident() for k in keys]
    assert cache.is_resident((0, 2)) and not cache.is_resident((0, 0))
    cache.store.close()  # every read now fails: a failed load is not resident
    lease = cache.try_acquire((0, 5))
    with pytest.raises(RuntimeError, match="closed"):
        lease.wait()
    lease.release()
    assert not cache.is_resident((0, 5)) and (0, 5) not in cache.resident()
    cache.close()


def test_concurrent_layers_share_one_cache(mixtral_dir, mixtral_model):
    cache, stats, layout = _cache(mixtral_model, mixtral_dir, slots=4, threads=3)
    errors = []

    def worker(layer):
        try:
            for i in range(40):
                lease = cache.acquire((layer, (i * 3 + layer) % 8), timeout=30)
                lease.wait()
                lease.release()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(layer,)) for layer in (0, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.host.pool.allocated_bytes <= 4 * layout.slot_nbytes
    s = stats.snapshot()
    assert s["hits"] + s["misses"] == 120
    cache.close()


def test_timeline_records_io_compute_and_layers(mixtral_dir):
    from transformers import AutoModelForCausalLM

    off = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "30%", "prefetch": "none"})
    tl = off.offload_engine.cache.timeline
    off.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert tl.events() == []  # off by default
    tl.enabled = True
    off.reset_offload_stats()
    off.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    kinds = {e.kind for e in tl.events()}
    assert {"io", "compute", "layer"} <= kinds
    io = [e for e in tl.events() if e.kind == "io"]
    assert all(e.end >= e.start and e.args["bytes"] > 0 for e in io)
    assert len(io) == off.offload_stats()["loads"]
    layers = [e for e in tl.events() if e.kind == "layer"]
    assert {e.args["layer"] for e in layers} == {0, 1}

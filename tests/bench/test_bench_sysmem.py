"""`hf_moe_offload.bench.sysmem`: page-cache residency (after `scheduling.profile.evict_page_cache`), RSS split,
process I/O, memory cgroups. The disk bandwidth is tested with the profile (test_scheduling.py)."""

import mmap
import os
import sys
import time

import pytest

from hf_moe_offload.bench import sysmem
from hf_moe_offload.scheduling.profile import evict_page_cache

MiB = 1024**2


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(8 * MiB))
    return path


def test_evict_then_read_changes_residency(data_file):
    assert evict_page_cache(data_file) == 8 * MiB
    assert sysmem.page_cache_resident_bytes(data_file) <= MiB // 8  # a few pages may come back (readahead, fs)
    data_file.read_bytes()
    assert sysmem.page_cache_resident_bytes(data_file) > 7 * MiB
    evict_page_cache(data_file.parent)  # a directory covers every file under it
    assert sysmem.page_cache_resident_bytes(data_file.parent) <= MiB // 8


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        evict_page_cache(tmp_path / "nope")


def test_rss_breakdown_keys_and_sampler():
    rss = sysmem.rss_breakdown()
    assert {"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSwap"} <= rss.keys()
    assert rss["RssAnon"] > 0 and rss["VmHWM"] >= rss["VmRSS"] > 0
    assert sysmem.rss_breakdown(os.getpid())["RssAnon"] > 0
    with sysmem.PeakRssSampler(interval_s=0.01) as peak:
        # A fresh anonymous mapping, not malloc: in a long-lived process malloc may hand back freed heap pages
        # that are already resident, and the anonymous RSS would not grow.
        block = mmap.mmap(-1, 64 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, 64 * MiB, 4096):
            block[off] = 1
        time.sleep(0.1)  # the sampler is periodic (10 ms): hold the block across several samples
        block.close()
    assert peak.peak["RssAnon"] >= rss["RssAnon"] + 48 * MiB


def test_process_io_counts_bytes_read(data_file):
    before = sysmem.process_io()
    data_file.read_bytes()
    after = sysmem.process_io()
    assert after["read_chars"] >= before["read_chars"] + 8 * MiB  # read() calls, page-cache hits included
    assert sysmem.process_io(os.getpid()).keys() == after.keys()


def _cgroup_or_skip():
    try:
        return sysmem.find_memory_cgroup()
    except sysmem.CgroupUnavailableError as err:
        pytest.skip(f"cgroup v1 memory controller unavailable: {err}")


def test_run_in_memory_cgroup_limits_memory():
    parent = _cgroup_or_skip()
    before = set(parent.iterdir())
    ok = sysmem.run_in_memory_cgroup([sys.executable, "-c", "print(open('/proc/self/cgroup').read())"], 128 * MiB)
    assert ok.completed.returncode == 0 and "hf_moe_offload-" in ok.completed.stdout
    assert 0 < ok.max_usage_bytes <= 128 * MiB
    hog = "b = bytearray(256 * 1024**2); b[::4096] = b'x' * len(b[::4096])"
    killed = sysmem.run_in_memory_cgroup([sys.executable, "-c", hog], 96 * MiB)
    assert killed.completed.returncode != 0 and killed.failcnt > 0
    assert set(parent.iterdir()) == before  # the child groups were removed

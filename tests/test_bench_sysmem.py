"""`hf_moe_offload.bench.sysmem`: page-cache eviction and residency, RSS split, memory cgroups, bandwidth."""

import os
import sys
import time

import pytest

from hf_moe_offload.bench import sysmem

MiB = 1024**2


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(8 * MiB))
    return path


def test_evict_then_read_changes_residency(data_file):
    assert sysmem.evict_page_cache(data_file) == 8 * MiB
    assert sysmem.page_cache_resident_bytes(data_file) <= MiB // 8  # a few pages may come back (readahead, fs)
    data_file.read_bytes()
    assert sysmem.page_cache_resident_bytes(data_file) > 7 * MiB
    sysmem.evict_page_cache(data_file.parent)  # a directory covers every file under it
    assert sysmem.page_cache_resident_bytes(data_file.parent) <= MiB // 8


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        sysmem.evict_page_cache(tmp_path / "nope")


def test_rss_breakdown_keys_and_sampler():
    rss = sysmem.rss_breakdown()
    assert {"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSwap"} <= rss.keys()
    assert rss["RssAnon"] > 0 and rss["VmHWM"] >= rss["VmRSS"] > 0
    assert sysmem.rss_breakdown(os.getpid())["RssAnon"] > 0
    with sysmem.PeakRssSampler(interval_s=0.01) as peak:
        block = bytearray(64 * MiB)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.1)  # the sampler is periodic (10 ms): hold the block across several samples
        del block
    assert peak.peak["RssAnon"] >= rss["RssAnon"] + 48 * MiB


def test_measure_disk_bandwidth_is_positive(data_file):
    assert sysmem.measure_disk_bandwidth(data_file, block=MiB) > 0
    assert sysmem.measure_disk_bandwidth(data_file, block=MiB, cold=False, max_bytes=4 * MiB) > 0


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

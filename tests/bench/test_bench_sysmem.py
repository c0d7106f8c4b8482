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
        pytest.skip(f"no usable memory cgroup (v1 or v2) on this machine: {err}")


def test_run_in_memory_cgroup_limits_memory():
    parent = _cgroup_or_skip()
    before = set(parent.iterdir())
    ok = sysmem.run_in_memory_cgroup([sys.executable, "-c", "print(open('/proc/self/cgroup').read())"], 128 * MiB)
    assert ok.completed.returncode == 0 and "hf_moe_offload-" in ok.completed.stdout
    assert 0 < ok.max_usage_bytes <= 128 * MiB
    hog = "b = bytearray(256 * 1024**2); b[::4096] = b'x' * len(b[::4096])"
    killed = sysmem.run_in_memory_cgroup([sys.executable, "-c", hog], 96 * MiB)
    assert killed.completed.returncode != 0 and killed.failcnt > 0
    assert ok.cgroup_version == killed.cgroup_version == sysmem.cgroup_version(parent)
    assert set(parent.iterdir()) == before  # the child groups were removed


# cgroup layouts written as files in tmp_path: the kernel's interface files are plain text, so finding the group,
# telling the versions apart and parsing the counters can be checked on any machine, whatever it mounts.
V1_SELF = "9:name=systemd:/\n4:memory:/jobs/42\n0::/\n"
V2_SELF = "0::/user.slice/bench.scope\n"


def _v1_tree(root):
    group = root / "memory" / "jobs" / "42"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    return group


def _v2_tree(root, controllers="cpu io memory pids", procs=None):
    group = root / "unified" / "user.slice" / "bench.scope"
    group.mkdir(parents=True)
    (group / "cgroup.controllers").write_text(controllers + "\n")
    (group / "cgroup.subtree_control").write_text("\n")
    (group / "cgroup.procs").write_text(f"{os.getpid() if procs is None else procs}\n")
    return group


def test_cgroup_v1_group_is_this_process_memory_group(tmp_path):
    group = _v1_tree(tmp_path)
    mounts = [("cgroup", str(tmp_path / "cpu"), "rw,cpu"), ("cgroup", str(tmp_path / "memory"), "rw,relatime,memory")]
    assert sysmem.find_memory_cgroup(mounts=mounts, proc_cgroup=V1_SELF) == group
    assert sysmem.cgroup_version(group) == 1


def test_cgroup_v1_wins_on_a_hybrid_machine(tmp_path):
    """Hybrid layout (v1 controllers, an empty v2 `unified` tree): the memory controller lives in v1."""
    group = _v1_tree(tmp_path)
    _v2_tree(tmp_path, controllers="")
    mounts = [("cgroup2", str(tmp_path / "unified"), "rw"), ("cgroup", str(tmp_path / "memory"), "rw,memory")]
    assert sysmem.find_memory_cgroup(mounts=mounts, proc_cgroup=V1_SELF + V2_SELF) == group


def test_cgroup_v2_enables_memory_for_children_moving_this_process_to_a_leaf(tmp_path):
    group = _v2_tree(tmp_path)
    mounts = [("cgroup2", str(tmp_path / "unified"), "rw,nosuid,nodev,noexec,relatime")]
    assert sysmem.find_memory_cgroup(mounts=mounts, proc_cgroup=V2_SELF) == group
    assert sysmem.cgroup_version(group) == 2
    assert (group / "cgroup.subtree_control").read_text().split() == ["+memory"]
    assert (group / "hf_moe_offload-self" / "cgroup.procs").read_text() == str(os.getpid())


def test_cgroup_v2_with_memory_enabled_is_used_as_is(tmp_path):
    group = _v2_tree(tmp_path, procs="")
    (group / "cgroup.subtree_control").write_text("cpu memory\n")
    assert (
        sysmem.find_memory_cgroup(mounts=[("cgroup2", str(tmp_path / "unified"), "rw")], proc_cgroup=V2_SELF) == group
    )
    assert not (group / "hf_moe_offload-self").exists()


@pytest.mark.parametrize(
    "mounts, controllers, match",
    [
        ([("ext4", "/", "rw")], "memory", "no memory cgroup is mounted"),
        ([("cgroup2", "{root}/unified", "rw")], "cpu pids", "memory controller is not available"),
    ],
)
def test_cgroup_unavailable_says_why(tmp_path, mounts, controllers, match):
    _v2_tree(tmp_path, controllers=controllers)
    mounts = [(fs, mount.format(root=tmp_path), opts) for fs, mount, opts in mounts]
    with pytest.raises(sysmem.CgroupUnavailableError, match=match):
        sysmem.find_memory_cgroup(mounts=mounts, proc_cgroup=V2_SELF)


def test_group_usage_reads_each_version_counters(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.max_usage_in_bytes").write_text("1048576\n")
    (v1 / "memory.failcnt").write_text("3\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert sysmem.group_usage(v1) == (1048576, 3, 2)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("memory\n")
    (v2 / "memory.peak").write_text("2097152\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert sysmem.group_usage(v2) == (2097152, 7, 1)
    (v2 / "memory.peak").unlink()  # kernels before 5.19 keep no peak
    assert sysmem.group_usage(v2) == (-1, 7, 1)


def test_the_real_cgroup_v2_mount_when_there_is_one():
    """This machine's own unified hierarchy, v1 mounts left out: a v2 group with memory for children (pure v2
    machines, delegated groups), or the precise reason (hybrid machines: the controller is bound to v1)."""
    mounts = [m for m in sysmem._mount_table() if m[0] == "cgroup2"]
    if not mounts:
        pytest.skip("no cgroup2 mount on this machine")
    try:
        group = sysmem.find_memory_cgroup(mounts=mounts)
    except sysmem.CgroupUnavailableError as err:
        assert "cgroup v2:" in str(err) and ("not available" in str(err) or "cannot enable" in str(err)), err
        return
    assert sysmem.cgroup_version(group) == 2
    assert "memory" in (group / "cgroup.subtree_control").read_text().split()

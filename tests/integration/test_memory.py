"""Budgets are real: loading reads no expert bytes, generation stays within the budget, and the page cache does not
keep a second copy of the experts. Each case runs in a fresh process (tests/integration/_memory_probe.py) so its memory is its
own; anonymous memory (what a budget bounds) is told apart from file-backed pages and from the page cache."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # over 5 s on a 2-core CPU; still part of the default run

PROBE = os.path.join(os.path.dirname(__file__), "_memory_probe.py")
MiB = 2**20


def _probe(mode, folder):
    out = subprocess.run([sys.executable, PROBE, mode, folder], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("memprobe") / "m")
    _probe("build", path)
    return path


@pytest.fixture(scope="module")
def file_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_normal_load_caches_the_whole_checkpoint(folder, file_bytes):
    # the control: the measurement does see expert bytes when they are read
    r = _probe("normal", folder)
    assert r["cache_after_load"] > 0.9 * file_bytes


@pytest.mark.parametrize("mode", ["fadvise", "direct"])
def test_offloaded_load_and_generate_stay_within_budget(folder, mode):
    r = _probe(mode, folder)
    experts, other, budget = r["expert_bytes"], r["other_bytes"], r["budget_bytes"]
    assert experts >= 4 * other  # the model this test needs: experts at least 4x the rest
    assert r["cache_after_load"] <= other + 2 * MiB, "loading must not read expert bytes"
    assert r["load_anon_delta"] <= other + 16 * MiB
    assert r["pool_allocated"] <= budget <= 0.25 * experts
    assert r["stats"]["misses"] > 0 and r["stats"]["evictions"] > 0
    assert r["gen_anon_delta"] <= budget + 16 * MiB, "generation must stay within the host budget"
    # no second copy of the experts in the page cache (mmap readahead of the other weights may pull in a little)
    assert r["cache_after_generate"] <= other + 0.3 * experts


def test_cached_mode_does_fill_the_page_cache(folder):
    # the contrast that makes the test above meaningful
    r = _probe("cached", folder)
    assert r["cache_after_generate"] >= 0.8 * r["expert_bytes"]

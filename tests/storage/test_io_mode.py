"""`io_mode="auto"`: the page cache when every expert fits twice in the memory left, else O_DIRECT where the file
system takes it (a real ext4/xfs file here), else fadvise (tmpfs refuses O_DIRECT)."""

from __future__ import annotations

import os

import pytest

from hf_moe_offload.storage import reader
from hf_moe_offload.storage.reader import choose_io_mode, direct_io_supported


@pytest.fixture
def disk_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(os.urandom(3 * 4096))
    return str(path)


def test_experts_that_fit_twice_in_the_room_left_use_the_page_cache(disk_file):
    assert choose_io_mode([disk_file], 100, 200)[0] == "cached"


def test_experts_that_do_not_fit_read_direct_where_the_file_system_allows(disk_file):
    if not direct_io_supported(disk_file):
        pytest.skip(f"the file system of {disk_file} refuses O_DIRECT")
    mode, why = choose_io_mode([disk_file], 101, 200)
    assert mode == "direct" and "O_DIRECT" in why


def test_a_file_system_without_o_direct_falls_back_to_fadvise(disk_file, monkeypatch):
    # tmpfs takes O_DIRECT since Linux 6.6, so no file system here is sure to refuse it: the probe's answer is forced
    monkeypatch.setattr(reader, "direct_io_supported", lambda path: False)
    mode, why = reader.choose_io_mode([disk_file], 10**12, 0)
    assert mode == "fadvise" and "refuses O_DIRECT" in why


def test_a_missing_file_is_not_direct_capable(tmp_path):
    assert not direct_io_supported(str(tmp_path / "absent"))

"""What transformers' distributed engine offers and offloading cannot run under yet is refused before anything loads,
with one typed error (`UnsupportedParallelismError`) that names the setting and the layouts that work."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from hf_moe_offload.errors import OffloadConfigError, UnsupportedParallelismError
from hf_moe_offload.integration import loading
from hf_moe_offload.integration.distributed import ExpertShard, expert_shard

REFUSED = {
    "tensor parallel experts": (dict(distributed_config=DistributedConfig(tp_size=2)), "tp_size=2 and ep_size=1"),
    "tp_plan argument": (dict(tp_plan="auto"), "tp_plan='auto'"),
    "pipeline parallel": (dict(distributed_config=DistributedConfig(pp_size=2)), "pp_size=2"),
    "mega moe": (
        dict(distributed_config=DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation="deepgemm_megamoe")),
        "deepgemm_megamoe",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_before_loading(mixtral_dir, case, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    kwargs, setting = REFUSED[case]
    with pytest.raises(UnsupportedParallelismError, match=setting) as info:
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={}, **kwargs)
    assert "DistributedConfig(ep_size=N, fsdp_size=N)" in str(info.value)  # says what works instead
    assert isinstance(info.value, OffloadConfigError) and isinstance(info.value, ValueError)
    assert getattr(loading._state, "ctx", None) is None  # nothing was loaded


def test_expert_parallel_needs_a_launcher(mixtral_dir, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UnsupportedParallelismError, match="torchrun --nproc-per-node"):
        AutoModelForCausalLM.from_pretrained(
            mixtral_dir, offload_config={}, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
        )


def test_ep_size_must_divide_the_experts(mixtral_dir, monkeypatch):
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UnsupportedParallelismError, match="ep_size=3 must divide.*has 8"):
        AutoModelForCausalLM.from_pretrained(
            mixtral_dir, offload_config={}, distributed_config=DistributedConfig(fsdp_size=3, ep_size=3)
        )


def test_expert_shard_from_rank(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    assert expert_shard({}) is None
    assert expert_shard({"distributed_config": DistributedConfig(fsdp_size=2)}) is None  # FSDP alone: all experts
    shard = expert_shard({"distributed_config": {"fsdp_size": 4, "ep_size": 2}})  # a dict works too
    assert shard == ExpertShard(rank=1, size=2)  # the expert mesh is row-major: ep rank = rank % ep_size
    assert shard.owned(8) == range(4, 8)

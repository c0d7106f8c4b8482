"""One rank's view of a checkpoint under expert parallelism: local expert ids, its own byte ranges, its own budget."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload.adapters import describe_model
from hf_moe_offload.config import OffloadConfig
from hf_moe_offload.integration.distributed import (
    ExpertShard,
    rank_device,
    shard_correlation,
    shard_layout,
    shard_topology,
)
from hf_moe_offload.integration.plan import describe_checkpoint, plan_slots


def test_ranks_split_the_layout_without_overlap(mixtral_dir):
    topology, layout, _ = describe_checkpoint(mixtral_dir)
    seen = []
    for rank in (0, 1):
        shard = ExpertShard(rank, 2)
        local = shard_layout(layout, topology, shard)
        assert sorted(local.pieces) == [(layer.layer, i) for layer in topology.layers for i in range(4)]
        for layer in topology.layers:
            for i in range(4):
                assert local.pieces[(layer.layer, i)] == layout.pieces[(layer.layer, 4 * rank + i)]
        seen += [local.pieces[key] for key in sorted(local.pieces)]
        assert local.slot_nbytes == layout.slot_nbytes
    assert sorted(seen, key=repr) == sorted(layout.pieces.values(), key=repr)  # together: every expert, once


def test_budget_share_is_of_the_ranks_own_experts(mixtral_dir):
    topology, layout, _ = describe_checkpoint(mixtral_dir)
    local = shard_topology(topology, ExpertShard(1, 2))
    assert [layer.num_experts for layer in local.layers] == [4] * topology.num_layers
    assert local.total_expert_nbytes * 2 == topology.total_expert_nbytes
    cfg = OffloadConfig(host_budget="50%")
    full_slots, _ = plan_slots(cfg, topology, layout.slot_nbytes, torch.device("cpu"))
    local_slots, _ = plan_slots(cfg, local, layout.slot_nbytes, torch.device("cpu"))
    assert local_slots * 2 == full_slots


def test_lookahead_sees_the_owned_router_columns(mixtral_dir):
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    topology = describe_model(model)
    local = shard_topology(topology, ExpertShard(1, 2))
    hidden = torch.randn(5, model.config.hidden_size)
    full = topology.layers[0].router(hidden)
    full = full[0] if isinstance(full, tuple) else full
    torch.testing.assert_close(local.layers[0].router(hidden), full[..., 4:8])


def test_each_process_computes_on_its_own_accelerator(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device(cuda, {}) == cuda  # one process: as configured
    assert rank_device(cuda, {"distributed_config": object()}) == torch.device("cuda", 1)
    assert rank_device(cuda, {"device_map": {"": "cuda:3"}}) == torch.device("cuda", 3)  # e.g. lm_eval's placement
    assert rank_device(cuda, {"device_map": 2}) == torch.device("cuda", 2)
    assert rank_device(torch.device("cuda", 0), {"distributed_config": object()}) == torch.device("cuda", 0)
    assert rank_device(cpu, {"distributed_config": object()}) == cpu
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / accelerate launch without distributed_config (data parallel)
    assert rank_device(cuda, {}) == torch.device("cuda", 1)
    assert rank_device(cuda, {"device_map": "auto"}) == torch.device("cuda", 1)


def test_each_rank_reads_its_block_of_the_correlation_table(tmp_path):
    table = np.arange(64, dtype=np.float64).reshape(8, 8)  # counts of layer-0 expert -> layer-1 expert
    path = str(tmp_path / "correlation.npz")
    np.savez(path, table)
    np.testing.assert_array_equal(shard_correlation(path, [8, 8], None)[0], table)
    (local,) = shard_correlation(path, [4, 4], ExpertShard(1, 2))
    np.testing.assert_array_equal(local, table[4:8, 4:8])

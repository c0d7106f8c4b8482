"""Budgets fit the machine: shares shrink to the memory left, byte counts above it are refused, `max_memory=` is
honoured as a limit (or refused), and every load reports its decisions on the `hf_moe_offload` logger at INFO."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_offload.config import parse_budget
from hf_moe_offload.errors import BudgetTooLargeError, OffloadConfigError
from hf_moe_offload.integration import make_plan
from hf_moe_offload.integration.budgets import HEADROOM, TierLimit, available_host_bytes, fit_budget, tier_limits

CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def sizes(mixtral_dir):
    """(bytes per slot, bytes of the other weights, top-k, cls) of the tiny Mixtral."""
    cls = AutoModelForCausalLM._model_mapping[_config_type(mixtral_dir)]
    plan = make_plan(cls, mixtral_dir, {}, CPU)
    return plan.layout.slot_nbytes, plan.topology.other_nbytes, plan.topology.max_top_k, cls


def _config_type(folder):
    from transformers import AutoConfig

    return type(AutoConfig.from_pretrained(folder))


def _cpu_limit_for(slots: int, slot: int, other: int) -> int:
    """A `max_memory["cpu"]` that leaves room for exactly `slots` experts (plus half a slot)."""
    return math.ceil((slots * slot + slot // 2 + other) / HEADROOM)


def test_fit_budget_shrinks_shares_and_refuses_bytes():
    limit = TierLimit(1000, "90% of 1.00 KiB (test)")
    assert fit_budget("host_budget", parse_budget("50%"), 1000, limit) == 500  # fits: unchanged
    assert fit_budget("host_budget", parse_budget("100%"), 4000, limit) == 1000  # share: shrunk
    assert fit_budget("host_budget", parse_budget(999), 4000, limit) == 999
    assert fit_budget("host_budget", parse_budget(5000), 4000, None) == 5000  # no limit known
    with pytest.raises(BudgetTooLargeError, match=r"host_budget=1\.95 KiB .* at most 1000 bytes") as e:
        fit_budget("host_budget", parse_budget(2000), 4000, limit)
    assert isinstance(e.value, ValueError) and "(test)" in str(e.value)


def test_the_host_limit_is_the_available_memory_less_the_other_weights():
    limits = tier_limits(torch.device("cpu"), 10 << 20, {})
    available, source = available_host_bytes()
    assert set(limits) == {"host"} and source in limits["host"].source and "minus 10.00 MiB" in limits["host"].source
    assert 0 < limits["host"].nbytes < available * HEADROOM
    small = tier_limits(torch.device("cpu"), 10 << 20, {"host": 1 << 30})["host"]  # max_memory lowers it, exactly
    assert small.nbytes == int((1 << 30) * HEADROOM) - (10 << 20) and "max_memory['cpu']" in small.source
    assert tier_limits(torch.device("cpu"), 0, {"host": 1 << 60})["host"].source.endswith(f"({source})")  # never raises


def test_a_byte_budget_above_the_machine_is_refused_before_loading(mixtral_dir):
    with pytest.raises(BudgetTooLargeError) as e:
        AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={**CPU, "host_budget": "1000TiB"})
    msg = str(e.value)
    assert "host_budget=1000.00 TiB" in msg and ("available RAM" in msg or "cgroup" in msg), msg
    assert "at most" in msg and "'50%'" in msg, msg


def test_the_default_shrinks_to_a_machine_smaller_than_the_model(mixtral_dir, sizes, caplog):
    """max_memory stands in for a small machine: the default 50% share no longer fits and is shrunk, loudly at INFO."""
    slot, other, k, _ = sizes
    cpu = _cpu_limit_for(k + 1, slot, other)
    with caplog.at_level(logging.INFO, logger="hf_moe_offload"):
        model = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=CPU, max_memory={"cpu": cpu})
    assert model.offload_engine.host_slots == k + 1
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    shrunk = [r.getMessage() for r in caplog.records if "using" in r.getMessage()]
    assert len(shrunk) == 1 and "host_budget=50% of expert bytes" in shrunk[0] and "max_memory['cpu']" in shrunk[0]


def test_max_memory_refuses_a_larger_byte_budget(mixtral_dir, sizes):
    slot, other, k, cls = sizes
    cpu = _cpu_limit_for(k + 1, slot, other)
    with pytest.raises(BudgetTooLargeError, match=r"max_memory\['cpu'\]"):
        make_plan(cls, mixtral_dir, {"max_memory": {"cpu": cpu}}, {**CPU, "host_budget": 4 * (k + 1) * slot})
    plan = make_plan(cls, mixtral_dir, {"max_memory": {"cpu": str(cpu)}}, {**CPU, "host_budget": k * slot})
    assert plan.host_slots == k and "max_memory" not in plan.kwargs  # honoured here, never passed to transformers


@pytest.mark.parametrize(
    "max_memory, match",
    [
        ({"disk": "10GiB"}, r"key 'disk' has no meaning with offload_config=.*Allowed keys: 'cpu'"),
        ({"cpu": "25%"}, r"max_memory\['cpu'\]: expected bytes"),
        ({"cpu": "lots"}, r"max_memory\['cpu'\]: cannot read 'lots'"),
        (["cpu"], r"max_memory: expected a dict"),
    ],
)
def test_max_memory_that_cannot_apply_is_refused(mixtral_dir, sizes, max_memory, match):
    with pytest.raises(OffloadConfigError, match=match):
        make_plan(sizes[3], mixtral_dir, {"max_memory": max_memory}, CPU)


def test_a_load_reports_its_decisions_at_info(mixtral_dir, sizes, caplog):
    with caplog.at_level(logging.INFO, logger="hf_moe_offload"):
        plan = make_plan(sizes[3], mixtral_dir, {}, {**CPU, "host_budget": "50%", "io_mode": "cached"})
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hf_moe_offload"))
    assert f"host_budget=50% of expert bytes -> {plan.host_slots} slots" in text, text
    assert "computed on cpu" in text and "io_mode=cached" in text and "prefetch=gate_lookahead" in text, text
    assert "io_threads=2" in text, text
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name.startswith("hf_moe_offload"))


def test_the_logger_is_silent_unless_configured():
    """A NullHandler and no level of its own: with no logging configured, its INFO records go nowhere (Python's
    last-resort handler prints WARNING and above only); `logging.basicConfig(level=logging.INFO)` shows them."""
    logger = logging.getLogger("hf_moe_offload")
    assert [type(h) for h in logger.handlers] == [logging.NullHandler] and logger.level == logging.NOTSET
    assert logger.propagate and logging.lastResort.level == logging.WARNING


@pytest.mark.slow
def test_the_host_limit_follows_a_cgroup_memory_limit():
    """A process in a 2 GiB memory cgroup plans with what the cgroup leaves, not with the machine's RAM."""
    from hf_moe_offload.bench import sysmem

    try:
        sysmem.find_memory_cgroup()
    except sysmem.CgroupUnavailableError as err:
        pytest.skip(f"no usable memory cgroup (v1 or v2) on this machine: {err}")
    code = "from hf_moe_offload.integration.budgets import available_host_bytes as a; print(*a(), sep='|')"
    run = sysmem.run_in_memory_cgroup([sys.executable, "-c", code], 2 << 30, timeout=300)
    assert run.completed.returncode == 0, run.completed.stderr[-2000:]
    room, source = run.completed.stdout.strip().splitlines()[-1].split("|")
    assert source == "left under the cgroup memory limit" and 0 < int(room) < 2 << 30, (room, source)


def test_quantizing_on_load_reserves_its_staging_buffers_off_the_host_limit(mixtral_dir, sizes):
    """Quantizing on load reads each expert at full precision into a buffer each I/O thread keeps: the plan takes
    io_threads full experts off the host limit; a sidecar needs none."""
    slot, other, k, cls = sizes
    cpu = _cpu_limit_for(4, slot, other)  # room for 4 full-precision experts
    q = {**CPU, "host_budget": "100%", "expert_dtype": "int8", "sidecar": "none", "io_threads": 2}
    full = make_plan(cls, mixtral_dir, {"max_memory": {"cpu": cpu}}, {**CPU, "host_budget": "100%"})
    quant = make_plan(cls, mixtral_dir, {"max_memory": {"cpu": cpu}}, q)
    packed = quant.slot_layout.slot_nbytes
    assert full.host_slots == 4
    assert quant.host_slots == (4 * slot + slot // 2 - 2 * slot) // packed  # 2 I/O threads, a staging buffer each
    one = make_plan(cls, mixtral_dir, {"max_memory": {"cpu": cpu}}, {**q, "io_threads": 1})
    assert one.host_slots == (4 * slot + slot // 2 - 1 * slot) // packed

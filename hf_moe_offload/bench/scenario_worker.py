"""The worker of `hf-moe-offload bench`: load one configuration once, then time each scenario point in turn.

```
spec (JSON) -> load: memory | accelerate (device_map="auto", max_memory, offload_folder) | offload (offload_config)
            -> for point in points:  [evict] -> prompt (B, L) -> generate(N tokens, StepTimer) [under replay_routing]
                                     -> TTFT, decode step times, bytes moved / read per step, expert compute time
            -> one JSON dict (decode_bench's spawn_worker prints it for the driver)
```

Runs inside a fresh process started by `decode_bench.spawn_worker` (spec key `entry`), or in the driver's
process for tests. Points run in the order given with the same loaded model, so the library's expert cache carries
over from one point to the next as in a long-running server (each finished point is also written to
`spec["partial_path"]`, so a later point that runs out of memory does not lose the earlier ones); the page cache is evicted before every point and, in
"cold" mode, between decode steps too (outside the timed region). Prompts are tokenized text when the model folder
has a tokenizer (realistic routing for a trained model), otherwise seeded random ids. With a routing trace
(`replay`), every model follows the recorded routing: the recording's prompt length, a batch up to the recording's.
With `spec["forced_ids"]` (the driver's ids, drawn once) the prompt is theirs and generation is teacher-forced
(`ForcedTokens`): "tokens" are then the model's top-1 ids. A `llamacpp` spec is handed to `bench.llamacpp`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from transformers import LogitsProcessor

from ..scheduling.profile import evict_page_cache
from .decode_bench import StepTimer, accelerate_disk_bytes, scalar_offload_stats
from .sysmem import PeakRssSampler, process_io, quantile, rss_breakdown

__all__ = ["ForcedTokens", "load_config_model", "prompt_ids", "run_point", "run_spec", "PROMPT_TEXT"]

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made books cheap "
    "enough for merchants, students and craftsmen. Within fifty years presses ran in more than two hundred cities, "
    "and the number of books in Europe grew from thousands to millions. Scholars argued about what this meant for "
    "religion, science and the state; printers argued about prices, paper and the right to copy. A modern reader "
    "can trace the same debates in the arrival of the telegraph, the radio and the computer network, each of "
    "which lowered the cost of sending words and changed who could afford to speak."
)


def load_config_model(spec: dict):
    """Load the model of one configuration: `kind` is "memory", "accelerate" or "offload"."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    import hf_moe_offload  # noqa: F401  (installs the offload_config= hook)

    logging.disable_progress_bar()

    dtype = spec.get("dtype") or "auto"
    kwargs: dict = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    device = spec.get("device") or "cpu"
    if spec["kind"] == "accelerate":
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            max_memory = {index: spec["budget_bytes"], "cpu": 0}
        else:
            max_memory = {"cpu": spec["budget_bytes"]}
        kwargs.update(device_map="auto", max_memory=max_memory, offload_folder=spec["offload_folder"])
    elif spec["kind"] == "offload":
        kwargs["offload_config"] = dict(spec["offload_config"])
    elif device.startswith("cuda"):
        kwargs["device_map"] = device
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)


def prompt_ids(model_dir: str, vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """`(batch, length)` prompt ids: slices of `PROMPT_TEXT` tokenized when `model_dir` has a tokenizer, else random."""
    ids = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [i for i in tok(PROMPT_TEXT)["input_ids"] if i < vocab_size]
    except Exception:  # noqa: BLE001 - no tokenizer in the folder: random ids
        ids = None
    if not ids:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch, length), generator=gen)
    rows = []
    for b in range(batch):
        start = (b * 7 + seed) % len(ids)
        row = (ids[start:] + ids) * (length // len(ids) + 2)
        rows.append(row[:length])
    return torch.tensor(rows, dtype=torch.long)


class ForcedTokens(LogitsProcessor):
    """Teacher forcing: keeps the model's top-1 id of every step, then makes `generate()` emit the given id.

    Every contender of a run is then fed the same ids (the llama.cpp baseline too), so step times compare the same
    work and top-1 agreement compares predictions at the same positions, with no divergence after a first mismatch.

    Args:
        forced: `(B, N)` int64, the ids to emit at steps 0..N-1.
    """

    def __init__(self, forced: torch.Tensor):
        self.forced = forced
        self.predictions: list[list[int]] = []  # per step, the top-1 id of each sequence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        step = len(self.predictions)
        self.predictions.append(scores.argmax(-1).tolist())
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, self.forced[:, step : step + 1].to(scores.device), 0.0)


def _deltas(values: list) -> list:
    if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values):
        return []
    return [b - a for a, b in zip(values[:-1], values[1:])]


def _mean(values: list) -> float | None:
    return statistics.mean(values) if values else None


def run_point(model, spec: dict, point: dict, trace=None) -> dict:
    """Time one scenario point (`batch`, `prompt_len`, `new_tokens`) on a loaded model."""
    batch, length, n = point["batch"], point["prompt_len"], point["new_tokens"]
    engine = getattr(model, "offload_engine", None)
    timeline = engine.cache.timeline if engine is not None else None
    evict_paths = [p for p in (spec["model_dir"], spec.get("offload_folder")) if p and os.path.exists(p)]

    def evict() -> None:
        evict_page_cache(evict_paths)

    def snapshot():
        stats = engine.stats_dict() if engine is not None else {}
        return (
            time.perf_counter(),
            stats.get("bytes_loaded"),
            stats.get("bytes_h2d"),
            process_io().get("read_bytes"),
            stats.get("stall_seconds"),
        )

    forcing = None
    if spec.get("forced_ids"):  # the driver's ids: prompt (B, L) then the N ids every contender is fed
        ids = torch.tensor(spec["forced_ids"][point["key"]], dtype=torch.long)
        ids, forcing = ids[:, :length], ForcedTokens(ids[:, length : length + n])
    else:
        ids = prompt_ids(spec["model_dir"], model.config.vocab_size, batch, length, spec.get("seed", 0) + batch)
    ids = ids.to(spec.get("device") or "cpu")  # not model.device: meta when accelerate put every weight on "disk"
    before = engine.stats_dict() if engine is not None else {}
    if spec["mode"] != "warm":
        evict()
    if timeline is not None:
        timeline.clear()
        timeline.enabled = True
    timer = StepTimer(between_steps=evict if spec["mode"] == "cold" else None, per_step=snapshot)
    eos = model.config.eos_token_id
    pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if spec.get("sample") else {}
    torch.manual_seed(spec.get("seed", 0))
    replay = None
    if trace is not None:
        from ..integration.tracing import replay_routing

        replay = replay_routing(model, trace)
        replay.__enter__()
    try:
        timer.start()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                logits_processor=[timer] if forcing is None else [timer, forcing],
                pad_token_id=pad,
                **sampling,
            )
    finally:
        if replay is not None:
            replay.__exit__(None, None, None)
        if timeline is not None:
            timeline.enabled = False
    after = engine.stats_dict() if engine is not None else {}
    marks = [e[0] for e in timer.extras]
    decode = timer.steps[1:]
    result = {
        "ttft_s": timer.steps[0],
        "decode_steps_s": decode,
        "step_p50_s": quantile(decode, 0.5),
        "step_p90_s": quantile(decode, 0.9),
        "gen_s": sum(timer.steps),
        "tok_s": batch * len(timer.steps) / sum(timer.steps),
        "decode_tok_s": batch * len(decode) / sum(decode) if decode else None,
        "tokens": out[0, length:].tolist() if forcing is None else [p[0] for p in forcing.predictions],
        "disk_read_bytes_per_step": _mean(_deltas([e[3] for e in timer.extras])),
    }
    if spec["kind"] == "accelerate":
        result["moved_bytes_per_step"] = spec.get("disk_bytes")
    elif engine is not None:
        result["moved_bytes_per_step"] = _mean(_deltas([e[1] for e in timer.extras]))
        result["h2d_bytes_per_step"] = _mean(_deltas([e[2] for e in timer.extras])) or None
        wasted = after["prefetch_wasted_bytes"] - before["prefetch_wasted_bytes"]
        result["wasted_bytes_per_step"] = wasted / max(1, len(timer.steps))  # speculative reads never used
        hits, misses = (after[k] - before[k] for k in ("hits", "misses"))
        result.update(hits=hits, misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None)
        steps = max(1, len(decode))
        result["stall_s_per_step"] = _mean(_deltas([e[4] for e in timer.extras]))
        if len(marks) >= 2:  # expert math inside the decode window: the compute part of the lower bound
            busy = sum(
                e.end - e.start
                for e in timeline.events()
                if e.kind == "compute" and e.start >= marks[0] and e.end <= marks[-1]
            )
            result["compute_s_per_step"] = busy / steps
        timeline.clear()
    else:
        result["moved_bytes_per_step"] = 0
    return result


def run_spec(spec: dict) -> dict:
    """Load `spec`'s configuration once and run every point of `spec["points"]`; the worker's entry point."""
    if spec["kind"] == "llamacpp":
        from .llamacpp import run_llamacpp_spec

        return run_llamacpp_spec(spec)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    trace = None
    if spec.get("replay"):
        from ..prefetch.trace import RoutingTrace

        trace = RoutingTrace.load(spec["replay"])
    result: dict = {"points": {}}
    with PeakRssSampler() as peak:
        start = time.perf_counter()
        model = load_config_model(spec)
        result["load_s"] = time.perf_counter() - start
        if spec["kind"] == "accelerate":
            spec = dict(spec, disk_bytes=accelerate_disk_bytes(model))
            result["disk_bytes"] = spec["disk_bytes"]
        for point in spec["points"]:
            try:
                result["points"][point["key"]] = run_point(model, spec, point, trace)
            except Exception as e:  # noqa: BLE001 - one failed point must not lose the others
                result["points"][point["key"]] = {"error": f"{type(e).__name__}: {e}"}
            if spec.get("partial_path"):  # what the driver keeps if a later point kills this process
                with open(spec["partial_path"], "w", encoding="utf-8") as f:
                    json.dump({"load_s": result["load_s"], "points": result["points"]}, f)
    result["rss_peak"] = peak.peak
    result["rss_after"] = rss_breakdown()
    result["offload_stats"] = scalar_offload_stats(model)
    return result

"""The llama.cpp contender of `hf-moe-offload bench`: a GGUF run through `llama-cpp-python`, fed the same forced
token ids as the transformers contenders, timed step by step.

```
spec (kind "llamacpp", gguf path, forced_ids per point) -> Llama(gguf, use_mmap=True, n_threads=threads)
    -> for point (batch 1): [evict] -> eval(prompt) = TTFT -> top-1 id
                            -> for each forced id: [evict] eval([id]) (one decode step) -> top-1 id
    -> the scenario worker's result dict (step times, bytes read per step, top-1 ids as "tokens")
```

llama.cpp memory-maps the GGUF, as a user runs it: under `--ramlimit` the kernel pages its weights in and out of the
worker's memory cgroup. In "cold" mode the file is dropped from the page cache before every step; a live mapping
pins its pages, so the mapped range is first released with `madvise(MADV_DONTNEED)` (the next access faults the
page back in from disk, as after eviction). Bytes "moved" per step are the bytes the worker read from storage
(`/proc/self/io` `read_bytes`: mmap faults included). The top-1 ids are the argmax of the last position's logits,
read with `llama_get_logits_ith`, before the forced id is fed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import time

from ..errors import LlamaCppUnavailableError, UnsupportedFeatureError
from ..scheduling.profile import evict_page_cache
from .sysmem import PeakRssSampler, process_io, quantile, rss_breakdown

__all__ = ["release_mapped_file", "run_llamacpp_spec"]

_MADV_DONTNEED = 4


def release_mapped_file(path: str | os.PathLike) -> int:
    """Drop this process's page mappings of `path` (`madvise(MADV_DONTNEED)` on each of its ranges in
    `/proc/self/maps`), so that `evict_page_cache` can then evict the pages. Returns the bytes released."""
    target = os.path.realpath(path)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                    released += end - start
    return released


def _load(spec: dict, n_ctx: int, n_batch: int):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise LlamaCppUnavailableError(
            f"the llamacpp baseline needs llama-cpp-python: `pip install 'hf-moe-offload[llamacpp]'` ({e})"
        ) from e
    threads = spec.get("threads") or os.cpu_count()
    return Llama(
        model_path=spec["gguf"],
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        logits_all=False,
        verbose=False,
    )


def _top1(llm) -> int:
    import llama_cpp
    import numpy as np

    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


def run_point(llm, spec: dict, point: dict) -> dict:
    """Time one batch-1 point: the prompt (TTFT), then one decode step per forced id."""
    if point["batch"] != 1:
        raise UnsupportedFeatureError(
            f"llama-cpp-python's Llama decodes one sequence; {point['key']} has batch {point['batch']}: "
            "use --scenario latency or --batches 1 for the llamacpp baseline"
        )
    ids = spec["forced_ids"][point["key"]][0]
    prompt, forced = ids[: point["prompt_len"]], ids[point["prompt_len"] :]

    def evict() -> None:
        if spec["mode"] == "cold":
            release_mapped_file(spec["gguf"])
        evict_page_cache(spec["gguf"])

    llm.reset()  # the next eval() overwrites the KV cache from position 0
    if spec["mode"] != "warm":
        evict()
    steps, tokens, reads = [], [], []
    start = time.perf_counter()
    llm.eval(prompt)
    steps.append(time.perf_counter() - start)
    tokens.append(_top1(llm))
    for token in forced[:-1]:  # generate() never feeds its last token either: N predictions, N - 1 decode steps
        if spec["mode"] == "cold":
            evict()
        before = process_io().get("read_bytes")
        start = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - start)
        after = process_io().get("read_bytes")
        if before is not None and after is not None:
            reads.append(after - before)
        tokens.append(_top1(llm))
    decode = steps[1:]
    per_step = sum(reads) / len(reads) if reads else None
    return {
        "ttft_s": steps[0],
        "decode_steps_s": decode,
        "step_p50_s": quantile(decode, 0.5),
        "step_p90_s": quantile(decode, 0.9),
        "gen_s": sum(steps),
        "tok_s": len(steps) / sum(steps),
        "decode_tok_s": len(decode) / sum(decode) if decode else None,
        "tokens": tokens,
        "disk_read_bytes_per_step": per_step,
        "moved_bytes_per_step": per_step,
    }


def run_llamacpp_spec(spec: dict) -> dict:
    """Load the GGUF once and run every point of `spec["points"]`; the worker entry for `kind == "llamacpp"`."""
    points = spec["points"]
    n_ctx = max(p["prompt_len"] + p["new_tokens"] for p in points) + 8
    result: dict = {"points": {}}
    with PeakRssSampler() as peak:
        start = time.perf_counter()
        llm = _load(spec, n_ctx, max(p["prompt_len"] for p in points))
        result["load_s"] = time.perf_counter() - start
        for point in points:
            try:
                result["points"][point["key"]] = run_point(llm, spec, point)
            except Exception as e:  # noqa: BLE001 - one failed point must not lose the others
                result["points"][point["key"]] = {"error": f"{type(e).__name__}: {e}"}
            if spec.get("partial_path"):
                with open(spec["partial_path"], "w", encoding="utf-8") as f:
                    json.dump({"load_s": result["load_s"], "points": result["points"]}, f)
    result["rss_peak"] = peak.peak
    result["rss_after"] = rss_breakdown()
    result["offload_stats"] = None
    result["gguf_bytes"] = os.path.getsize(spec["gguf"])
    return result

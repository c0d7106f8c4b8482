"""Medians, ratios and physical lower bounds of `hf-moe-offload bench` runs: a table per scenario point for people,
a dict for the final JSON line.

```
{config: [worker result per rep]} ──> summarise() ──> {point: {config: medians, x accelerate, x memory, bound}}
                                  ──> summarise_configs() ──> {config: load time, peak memory, cgroup usage}
                                  ──> format_tables() (text)
```

Speed is `1 / p50 decode step` for the latency point and generated tokens/s for throughput points; `x_accelerate`
and `x_memory` divide it by the same speed of accelerate at the same budget and of the in-memory model. The lower
bound of a decode step is `max(compute, moved bytes / bandwidth, h2d bytes / h2d bandwidth)` (the planner's
roofline, `scheduling.planner.lower_bound`, over the bandwidths of the `scheduling.profile.HardwareProfile` that
`hf-moe-offload plan` uses too) with compute = the in-memory model's p50 step when it was measured, else the expert
compute the timeline recorded; moved bytes = what accelerate reloads per forward (every parameter it placed on
"disk"), what this library read (`bytes_loaded` per step), nothing for the in-memory model. `efficiency` = bound /
measured p50 step. For llama.cpp the bound is its I/O alone (bytes it paged in / bandwidth): the transformers step is
no floor for its kernels. `top1_vs_memory` compares each configuration's first-run ids with the in-memory model's
(top-1 agreement when the run was teacher-forced).
"""

from __future__ import annotations

import platform
import statistics

from ..config import format_bytes
from ..scheduling.cost_model import lower_bound
from ..scheduling.profile import HardwareProfile
from .scenario_bench import BenchConfig

__all__ = ["format_tables", "limits_record", "summarise", "summarise_configs", "versions_record"]


def limits_record(profile: HardwareProfile) -> dict:
    """The `limits` of the JSON line (docs/benchmarks.md): the profile's bandwidths under their documented keys."""
    return {
        "disk_Bps": profile.disk_read_Bps,
        "page_cache_Bps": profile.page_cache_read_Bps,
        "h2d_Bps": profile.h2d_Bps,
        "disk_samples_Bps": list(profile.disk_samples_Bps),
    }


def versions_record() -> dict:
    """The `versions` of the JSON line: what produced the figures."""
    import torch
    import transformers

    from .. import __version__

    return {
        "hf_moe_offload": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ok_points(results: list[dict], key: str) -> list[dict]:
    points = [r.get("points", {}).get(key) for r in results]
    return [p for p in points if p and "error" not in p]


def _problems(results: list[dict], key: str) -> list[str]:
    """Errors of the runs without this point: the point's own, else the run's (a worker that never loaded)."""
    out = set()
    for r in results:
        point = r.get("points", {}).get(key)
        if point is None and "error" in r:
            out.add(r["error"])
        elif point is not None and "error" in point:
            out.add(point["error"])
    return sorted(out)


def _speed(point: dict, s: dict) -> float | None:
    if point["scenario"] == "latency":
        return 1 / s["step_p50_s"] if s["step_p50_s"] else None
    return s["tok_s"]


def summarise(
    runs: dict[str, list[dict]], configs: list[BenchConfig], points: list[dict], limits: HardwareProfile, mode: str
) -> dict[str, dict[str, dict]]:
    """`{point key: {config name: summary}}` (see the module docstring for the derived columns)."""
    bandwidth = limits.page_cache_read_Bps if mode == "warm" else limits.disk_read_Bps
    out: dict[str, dict[str, dict]] = {}
    for point in points:
        key = point["key"]
        table: dict[str, dict] = {}
        for cfg in configs:
            ok = _ok_points(runs.get(cfg.name, []), key)
            s = {
                "kind": cfg.kind,
                "budget": cfg.budget,
                "runs_ok": len(ok),
                "runs": len(runs.get(cfg.name, [])),
                "ttft_s": _median(p["ttft_s"] for p in ok),
                "step_p50_s": _median(p["step_p50_s"] for p in ok),
                "step_p90_s": _median(p["step_p90_s"] for p in ok),
                "tok_s": _median(p["tok_s"] for p in ok),
                "tok_s_samples": [p["tok_s"] for p in ok],
                "decode_tok_s": _median(p["decode_tok_s"] for p in ok),
                "moved_bytes_per_step": _median(p.get("moved_bytes_per_step") for p in ok),
                "h2d_bytes_per_step": _median(p.get("h2d_bytes_per_step") for p in ok),
                "disk_read_bytes_per_step": _median(p.get("disk_read_bytes_per_step") for p in ok),
                "wasted_bytes_per_step": _median(p.get("wasted_bytes_per_step") for p in ok),
                "compute_s_per_step": _median(p.get("compute_s_per_step") for p in ok),
                "stall_s_per_step": _median(p.get("stall_s_per_step") for p in ok),
                "hit_rate": _median(p.get("hit_rate") for p in ok),
                "problems": _problems(runs.get(cfg.name, []), key),
            }
            s["speed"] = _speed(point, s)
            s["_tokens"] = [p["tokens"] for p in ok]
            table[cfg.name] = s
        memory = table.get("memory")
        reference = memory["_tokens"][0] if memory and memory["_tokens"] else None
        for cfg in configs:
            s = table[cfg.name]
            compute = memory["step_p50_s"] if memory and memory["step_p50_s"] else s["compute_s_per_step"]
            if cfg.kind == "llamacpp":  # its own kernels: the transformers step is no floor for it; I/O bound only
                compute = None
            s["compute_ref_s"] = compute
            s["lower_bound_s"] = lower_bound(
                compute, s["moved_bytes_per_step"], bandwidth, s["h2d_bytes_per_step"], limits.h2d_Bps
            )
            step = s["step_p50_s"]
            s["efficiency"] = s["lower_bound_s"] / step if s["lower_bound_s"] and step else None
            accel = table.get(f"accelerate@{cfg.budget}")
            s["x_accelerate"] = s["speed"] / accel["speed"] if accel and accel["speed"] and s["speed"] else None
            s["x_memory"] = s["speed"] / memory["speed"] if memory and memory["speed"] and s["speed"] else None
            tokens = s.pop("_tokens")
            s["tokens_match_memory"] = None if reference is None or not tokens else all(t == reference for t in tokens)
            s["top1_vs_memory"] = _agreement(tokens[0], reference) if reference is not None and tokens else None
        out[key] = table
    return out


def _agreement(tokens: list[int], reference: list[int]) -> float | None:
    """Share of positions where two id sequences agree (top-1 agreement when both were teacher-forced)."""
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / n if n else None


def summarise_configs(runs: dict[str, list[dict]], configs: list[BenchConfig], sizes: dict[str, int]) -> dict:
    """Per configuration: budget bytes, median load time and peak memory of its worker processes."""
    out = {}
    for cfg in configs:
        ok = [r for r in runs.get(cfg.name, []) if "error" not in r]
        partial = [r for r in runs.get(cfg.name, []) if "load_s" in r]  # runs that loaded, even if they died later
        out[cfg.name] = {
            "kind": cfg.kind,
            "budget": cfg.budget,
            "budget_bytes": cfg.budget_bytes(sizes),
            "host_slots": _median((r.get("offload_stats") or {}).get("host_slots") for r in ok),
            "note": cfg.note,
            "offload_config": cfg.offload_config,
            "load_s": _median(r.get("load_s") for r in partial),
            "peak_anon_bytes": _median(r.get("rss_peak", {}).get("RssAnon") for r in ok),
            "peak_file_bytes": _median(r.get("rss_peak", {}).get("RssFile") for r in ok),
            "cgroup_max_usage_bytes": _median(r.get("cgroup_max_usage") for r in ok),
            "accelerate_disk_bytes": _median(r.get("disk_bytes") for r in ok),
            "errors": sorted({r["error"] for r in runs.get(cfg.name, []) if "error" in r}),
        }
    return out


def _f(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def format_tables(
    results: dict[str, dict[str, dict]], points: list[dict], config_info: dict, *, limits: HardwareProfile, mode: str
) -> str:
    """Plain-text tables: the configurations, then one table per scenario point."""
    bound_bw = "page cache" if mode == "warm" else "disk"
    lines = [f"mode {mode}; bandwidth {limits.describe()}; bounds use the {bound_bw} bandwidth", ""]
    lines.append(
        f"{'config':<30}{'budget':>11}{'slots':>6}{'load s':>8}{'peak anon GB':>13}{'cgroup max GB':>14}  note"
    )
    for name, c in config_info.items():
        lines.append(
            f"{name:<30}{format_bytes(c['budget_bytes']):>11}{_f(c['host_slots'], '.0f'):>6}{_f(c['load_s'], '.1f'):>8}"
            f"{_f(c['peak_anon_bytes'], '.2f', 1e9):>13}{_f(c['cgroup_max_usage_bytes'], '.2f', 1e9):>14}"
            f"  {c['note']}"
        )
        for err in c["errors"]:
            lines.append(f"{'':<30}error: {err.splitlines()[-1] if err else ''}")
    for point in points:
        table = results[point["key"]]
        lines += [
            "",
            f"{point['key']}: batch {point['batch']}, prompt {point['prompt_len']}, "
            f"{point['new_tokens']} new tokens (medians of {max(s['runs'] for s in table.values())} runs)",
        ]
        lines.append(
            f"{'config':<30}{'TTFT s':>8}{'p50 ms':>9}{'p90 ms':>9}{'tok/s':>9}{'x accel':>8}{'x mem':>7}"
            f"{'moved MB':>9}{'disk MB':>8}{'wasted MB':>10}{'hit %':>6}{'stall ms':>9}{'bound ms':>9}{'effic.':>7}"
            f"{'same tok':>9}{'top-1 %':>8}"
        )
        for name, s in table.items():
            lines.append(
                f"{name:<30}{_f(s['ttft_s'], '.2f'):>8}{_f(s['step_p50_s'], '.1f', 1e-3):>9}"
                f"{_f(s['step_p90_s'], '.1f', 1e-3):>9}{_f(s['tok_s'], '.2f'):>9}{_f(s['x_accelerate']):>8}"
                f"{_f(s['x_memory']):>7}{_f(s['moved_bytes_per_step'], '.1f', 1e6):>9}"
                f"{_f(s['disk_read_bytes_per_step'], '.1f', 1e6):>8}{_f(s['wasted_bytes_per_step'], '.1f', 1e6):>10}"
                f"{_f(s['hit_rate'], '.0f', 0.01):>6}"
                f"{_f(s['stall_s_per_step'], '.1f', 1e-3):>9}{_f(s['lower_bound_s'], '.1f', 1e-3):>9}"
                f"{_f(s['efficiency']):>7}{str(s['tokens_match_memory']):>9}{_f(s['top1_vs_memory'], '.0f', 0.01):>8}"
            )
            for problem in s["problems"]:
                lines.append(f"{'':<30}{s['runs'] - s['runs_ok']} run(s) without a result: {problem.splitlines()[-1]}")
    lines += [
        "",
        "moved/disk MB: per decode step (moved = bytes the method had to bring in; disk = what the worker "
        "read from storage; wasted = prefetched bytes dropped unused); bound = max(compute, moved / bandwidth) (llamacpp: moved / bandwidth); "
        "effic. = bound / p50 step; top-1 % = agreement of the first run's top-1 ids with the memory model's",
    ]
    return "\n".join(lines)

"""Medians, ratios and physical lower bounds of `decode_bench` runs, as a table and as one JSON record.

```
{config: [run, run, ...]} ─> summarise() ─> {config: {median tok/s, bytes moved per step, lower bound, ...}}
                                         ─> format_table() for people, the dict itself as the final JSON line
```

The lower bound of a decode step is `bytes moved per step / bandwidth`: accelerate moves every parameter it
placed on "disk" on every forward; hf_moe_offload moves what its `offload_stats()["bytes_loaded"]` counts during
the decode steps; the in-memory model moves nothing from disk (no bound). `efficiency` is lower bound / measured
step time: 1.0 means the config runs at the speed of its own data movement. Above 1.0, part of the moved bytes
came from the page cache (inside the memory limit, or through a live mmap in "fadvise" mode), not from disk:
`disk MB/step` is what the worker process really fetched from storage (`/proc/self/io` `read_bytes`).
"""

from __future__ import annotations

import statistics

from hf_moe_offload.bench.decode_bench import config_budget

__all__ = ["format_table", "summarise"]

_KIND = {"a": "in memory", "b": "accelerate", "c": "hf_moe_offload"}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _moved_per_step(kind: str, runs: list[dict]) -> float | None:
    if kind == "b":
        return _median([r.get("disk_bytes") for r in runs])
    if kind == "c":
        per_step = [b for r in runs for b in r.get("decode_bytes_loaded", [])]
        if per_step:
            return statistics.mean(per_step)
        totals = [r["offload_stats"].get("bytes_loaded") for r in runs if "offload_stats" in r]
        steps = [len(r["decode_steps_s"]) + 1 for r in runs if "offload_stats" in r]
        if totals and all(isinstance(t, (int, float)) for t in totals):
            return sum(totals) / sum(steps)  # includes prefill: an over-estimate per decode step
    return 0.0 if kind == "a" else None


def summarise(runs: dict[str, list[dict]], sizes: dict[str, int], *, bandwidth: float, mode: str) -> dict[str, dict]:
    """Reduce each config's runs to medians, ratios vs accelerate and the physical lower bound per step.

    Args:
        runs: `{config name: [worker result, ...]}` from `run_benchmark`.
        sizes: `checkpoint_bytes` of the model.
        bandwidth: bytes/s of the tier the moved bytes come from (cold disk in "ramlimit"/"fadvise" modes).
        mode: the measurement mode, recorded with each figure.

    Returns:
        `{config name: summary dict}`.
    """
    out: dict[str, dict] = {}
    reference = next((r.get("tokens") for r in runs.get("a", []) if "tokens" in r), None)
    for name, results in runs.items():
        kind, percent, budget = config_budget(name, sizes)
        ok = [r for r in results if r.get("decode_tok_s")]
        speeds = [r["decode_tok_s"] for r in ok]
        moved = _moved_per_step(kind, ok)
        read = [b for r in ok for b in r.get("decode_read_bytes", [])]
        disk_read = statistics.mean(read) if read else None
        step_s = 1 / _median(speeds) if speeds else None
        bound = moved / bandwidth if moved else None
        stats = ok[-1].get("offload_stats") if ok else None
        out[name] = {
            "kind": _KIND[kind],
            "expert_percent": percent,
            "budget_bytes": budget,
            "mode": mode,
            "runs_ok": len(ok),
            "runs": len(results),
            "decode_tok_s_median": _median(speeds),
            "decode_tok_s_min": min(speeds, default=None),
            "decode_tok_s_max": max(speeds, default=None),
            "prefill_s_median": _median([r["prefill_s"] for r in ok]),
            "load_s_median": _median([r["load_s"] for r in ok]),
            "peak_anon_bytes": _median([r["rss_peak"]["RssAnon"] for r in ok]),
            "peak_file_bytes": _median([r["rss_peak"]["RssFile"] for r in ok]),
            "cgroup_max_usage_bytes": _median([r.get("cgroup_max_usage") for r in ok]),
            "moved_bytes_per_step": moved,
            "disk_read_bytes_per_step": disk_read,
            "lower_bound_s_per_step": bound,
            "efficiency": bound / step_s if bound and step_s else None,
            "tokens_match_a": None if reference is None or not ok else all(r["tokens"] == reference for r in ok),
            "offload_stats": stats,
            "problems": sorted({r.get("error") or r.get("skipped") for r in results if not r.get("decode_tok_s")}),
        }
    accel = [s for s in out.values() if s["kind"] == "accelerate" and s["decode_tok_s_median"]]
    for summary in out.values():
        match = [s for s in accel if s["expert_percent"] == summary["expert_percent"]] or accel
        speed = summary["decode_tok_s_median"]
        summary["vs_accelerate"] = speed / match[0]["decode_tok_s_median"] if match and speed else None
    return out


def _fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def format_table(summary: dict[str, dict], *, disk_bw: float, cache_bw: float, mode: str) -> str:
    """A plain-text table of `summarise` output, with the bandwidths and the mode in its title."""
    lines = [
        f"mode={mode}  disk (cold) {disk_bw / 1e9:.2f} GB/s  page cache {cache_bw / 1e9:.2f} GB/s",
        f"{'config':<7}{'kind':<15}{'budget GB':>10}{'tok/s':>8}{'min-max':>13}{'x accel':>8}{'prefill s':>10}"
        f"{'moved MB/step':>14}{'disk MB/step':>13}{'bound s':>9}{'effic.':>7}{'anon GB':>8}{'cg max GB':>10}{'same tok':>9}",
    ]
    for name, s in summary.items():
        spread = f"{_fmt(s['decode_tok_s_min'])}-{_fmt(s['decode_tok_s_max'])}"
        lines.append(
            f"{name:<7}{s['kind']:<15}{_fmt(s['budget_bytes'], '.2f', 1e9):>10}{_fmt(s['decode_tok_s_median'], '.3f'):>8}"
            f"{spread:>13}{_fmt(s['vs_accelerate']):>8}{_fmt(s['prefill_s_median']):>10}"
            f"{_fmt(s['moved_bytes_per_step'], '.1f', 1e6):>14}{_fmt(s['disk_read_bytes_per_step'], '.1f', 1e6):>13}"
            f"{_fmt(s['lower_bound_s_per_step'], '.3f'):>9}"
            f"{_fmt(s['efficiency']):>7}{_fmt(s['peak_anon_bytes'], '.2f', 1e9):>8}"
            f"{_fmt(s['cgroup_max_usage_bytes'], '.2f', 1e9):>10}{str(s['tokens_match_a']):>9}"
        )
        if s["offload_stats"]:
            lines.append(f"{'':<7}offload_stats: {s['offload_stats']}")
        for problem in s["problems"]:
            lines.append(f"{'':<7}{s['runs'] - s['runs_ok']} run(s) without a result: {problem}")
    return "\n".join(lines)

"""Turn a `cache.Timeline` into things people can look at: a Perfetto/Chrome trace, a PNG, and two numbers.

```
[Event(kind, name, start, end, thread, args)] --to_chrome_trace--> {"traceEvents": [...]}   (ui.perfetto.dev)
                                              --plot_timeline----> PNG lanes: steps | MoE layers | compute |
                                                                   stalls | one lane per I/O thread
                                              --timeline_metrics-> bubble fraction, I/O overlap, totals
```

* **Tracks.** The compute thread is the one that recorded the `layer` events (the thread running `generate`); every
  other thread that recorded `io` events is an I/O thread with a track of its own. A `steps` track holds one span
  per decode step (the first is the prefill): a step starts when the first MoE layer starts, so it also covers the
  attention and sampling that follow the layers.
* **Bubble fraction** = stall time / total MoE layer time: the share of the experts' wall time spent waiting for
  bytes. 0 means every load was hidden.
* **Overlap** = the share of I/O time during which the compute thread was not stalled (it ran attention, experts or
  sampling), within the traced span; `overlap_expert_compute` counts only time under `compute` events.
"""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = ["compute_thread", "step_spans", "timeline_metrics", "to_chrome_trace", "plot_timeline"]

_COLORS = {
    "compute": "#3b7dd8",
    "stall": "#d62728",
    "layer": "#c7c7c7",
    "disk->host": "#ff7f0e",
    "host->device": "#2ca02c",
    "step": ("#f2f2f2", "#e0e0e0"),
}


def compute_thread(events) -> str | None:
    """The thread that recorded the most `layer` events (else `compute` events)."""
    for kind in ("layer", "compute"):
        counts = Counter(e.thread for e in events if e.kind == kind)
        if counts:
            return counts.most_common(1)[0][0]
    return None


def _io_threads(events, main: str | None) -> list[str]:
    return sorted({e.thread for e in events if e.kind == "io" and e.thread != main})


def step_spans(events) -> list[tuple[float, float]]:
    """`(start, end)` per generation step: a step begins when the first MoE layer (lowest index) starts."""
    layers = sorted((e for e in events if e.kind == "layer"), key=lambda e: e.start)
    if not layers:
        return []
    first = min(e.args.get("layer", 0) for e in layers)
    starts = [e.start for e in layers if e.args.get("layer", 0) == first]
    end = max(e.end for e in layers)
    return [(s, starts[i + 1] if i + 1 < len(starts) else end) for i, s in enumerate(starts)]


def _merge(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _covered(start: float, end: float, merged: list[tuple[float, float]], starts: list[float]) -> float:
    """Length of `[start, end]` covered by the disjoint sorted `merged` intervals."""
    total = 0.0
    i = max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(merged) and merged[i][0] < end:
        total += max(0.0, min(end, merged[i][1]) - max(start, merged[i][0]))
        i += 1
    return total


def timeline_metrics(events) -> dict:
    """Totals and ratios of a timeline (seconds and bytes); see the module docstring for the definitions."""
    layer_s = sum(e.end - e.start for e in events if e.kind == "layer")
    stalls = [(e.start, e.end) for e in events if e.kind == "stall"]
    stall_s = sum(e - s for s, e in stalls)
    io = [e for e in events if e.kind == "io"]
    io_s = sum(e.end - e.start for e in io)
    spans = step_spans(events)
    window = (spans[0][0], spans[-1][1]) if spans else None
    out = {
        "steps": len(spans),
        "step_s": [e - s for s, e in spans],
        "span_s": window[1] - window[0] if window else 0.0,
        "moe_layer_s": layer_s,
        "stall_s": stall_s,
        "bubble_fraction": stall_s / layer_s if layer_s else None,
        "compute_s": sum(e.end - e.start for e in events if e.kind == "compute"),
        "io_s": io_s,
        "io_loads": len(io),
        "io_bytes": sum(int(e.args.get("bytes", 0)) for e in io),
        "io_speculative": sum(1 for e in io if e.args.get("speculative")),
        "io_threads": len(_io_threads(events, compute_thread(events))),
        "overlap": None,
        "overlap_expert_compute": None,
    }
    if io_s > 0 and window:
        stalled = _merge(stalls)
        st = [s for s, _ in stalled]
        hidden = 0.0
        for e in io:
            s, t = max(e.start, window[0]), min(e.end, window[1])
            if t > s:
                hidden += (t - s) - _covered(s, t, stalled, st)
        out["overlap"] = hidden / io_s
        busy = _merge((e.start, e.end) for e in events if e.kind == "compute")
        bs = [s for s, _ in busy]
        out["overlap_expert_compute"] = sum(_covered(e.start, e.end, busy, bs) for e in io) / io_s
    return out


def to_chrome_trace(events, *, meta: dict | None = None) -> dict:
    """Chrome trace-event JSON (`{"traceEvents": [...]}`, times in µs from the first event) for Perfetto.

    Complete events (`"ph": "X"`) on one track for the compute thread, one per I/O thread and one for the steps;
    metadata events (`"ph": "M"`) name the process and the tracks.
    """
    if not events:
        return {"traceEvents": [], "displayTimeUnit": "ms", "otherData": meta or {}}
    t0 = min(e.start for e in events)
    main = compute_thread(events)
    tids = {"steps": 1, main: 2}
    for i, name in enumerate(_io_threads(events, main)):
        tids[name] = 3 + i
    out = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "hf_moe_offload"}}]
    for name, tid in tids.items():
        label = "steps" if tid == 1 else ("compute" if tid == 2 else f"I/O {name}")
        out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": label}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}})

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 3)

    for i, (s, e) in enumerate(step_spans(events)):
        out.append(
            {
                "name": "prefill" if i == 0 else f"step {i}",
                "cat": "step",
                "ph": "X",
                "ts": us(s),
                "dur": round((e - s) * 1e6, 3),
                "pid": 1,
                "tid": 1,
                "args": {"step": i},
            }
        )
    for ev in sorted(events, key=lambda e: (e.start, -(e.end - e.start))):
        tid = tids.setdefault(ev.thread, len(tids) + 1)
        cat = ev.kind + (",speculative" if ev.args.get("speculative") else "")
        args = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in ev.args.items()}
        out.append(
            {
                "name": ev.name,
                "cat": cat,
                "ph": "X",
                "ts": us(ev.start),
                "dur": round((ev.end - ev.start) * 1e6, 3),
                "pid": 1,
                "tid": tid,
                "args": args,
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": meta or {}}


def plot_timeline(events, path: str, *, title: str = "", max_steps: int | None = None, dpi: int = 120) -> None:
    """Draw the timeline as horizontal lanes (x = ms) and save it as a PNG (matplotlib, Agg backend).

    Args:
        events: `Timeline.events()`.
        path: the PNG file.
        title: the figure title.
        max_steps: draw only the first steps (prefill included) so that decode steps stay readable.
        dpi: resolution.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = step_spans(events)
    if events and max_steps and len(spans) > max_steps:
        end = spans[max_steps - 1][1]
        events = [e for e in events if e.start < end]
        spans = spans[:max_steps]
    t0 = min((e.start for e in events), default=0.0)
    main = compute_thread(events)
    io_threads = _io_threads(events, main)
    lanes = ["steps", "MoE layers", "compute", "stalls"] + [f"I/O {i}" for i in range(len(io_threads))]
    y = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}
    fig, ax = plt.subplots(figsize=(16, 1.6 + 0.55 * len(lanes)))

    def ms(t: float) -> float:
        return (t - t0) * 1e3

    def bars(lane: str, items, color, *, hatch=None, alpha=1.0, edge=None, height=0.7) -> None:
        if items:
            ax.broken_barh(
                [(ms(s), (e - s) * 1e3) for s, e in items],
                (y[lane] - height / 2, height),
                facecolors=color,
                hatch=hatch,
                alpha=alpha,
                edgecolor=edge,
                linewidth=0.3,
            )

    for i, (s, e) in enumerate(spans):
        bars("steps", [(s, e)], _COLORS["step"][i % 2], edge="#999999")
        ax.axvline(ms(s), color="#888888", linewidth=0.6, linestyle="--", zorder=0)
        if (e - s) / max(spans[-1][1] - t0, 1e-9) > 0.02:
            ax.text(
                ms(s) + (e - s) * 500,
                y["steps"],
                "prefill" if i == 0 else f"step {i}",
                ha="center",
                va="center",
                fontsize=8,
            )
    layer_events = [e for e in events if e.kind == "layer" and e.thread == main]
    bars("MoE layers", [(e.start, e.end) for e in layer_events], _COLORS["layer"], edge="#777777")
    span_ms = max(ms(max((e.end for e in events), default=t0)), 1e-9)
    for e in layer_events:  # label the layer calls that are wide enough to hold it
        if (e.end - e.start) * 1e3 / span_ms > 0.025:
            ax.text(
                ms(e.start) + (e.end - e.start) * 500,
                y["MoE layers"],
                f"L{e.args.get('layer', '')}",
                ha="center",
                va="center",
                fontsize=7,
                color="#333333",
            )
    bars("compute", [(e.start, e.end) for e in events if e.kind == "compute"], _COLORS["compute"], edge="white")
    bars("stalls", [(e.start, e.end) for e in events if e.kind == "stall"], _COLORS["stall"])
    for i, thread in enumerate(io_threads):
        for tier in ("disk->host", "host->device"):
            mine = [
                e for e in events if e.kind == "io" and e.thread == thread and e.args.get("tier", "disk->host") == tier
            ]
            bars(
                f"I/O {i}",
                [(e.start, e.end) for e in mine if not e.args.get("speculative")],
                _COLORS[tier],
                edge="#333333",
            )
            bars(
                f"I/O {i}",
                [(e.start, e.end) for e in mine if e.args.get("speculative")],
                _COLORS[tier],
                hatch="////",
                alpha=0.45,
                edge="#333333",
            )
    ax.set_yticks([y[name] for name in lanes], lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, max((ms(e.end) for e in events), default=1.0) * 1.01)
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    legend = [
        Patch(facecolor=_COLORS["compute"], label="expert compute"),
        Patch(facecolor=_COLORS["stall"], label="stall (waiting for an expert)"),
        Patch(facecolor=_COLORS["layer"], edgecolor="#777777", label="MoE layer call"),
        Patch(facecolor=_COLORS["disk->host"], edgecolor="#333333", label="read disk->host (demand)"),
        Patch(
            facecolor=_COLORS["disk->host"],
            alpha=0.45,
            hatch="////",
            edgecolor="#333333",
            label="read disk->host (prefetch)",
        ),
    ]
    if any(e.kind == "io" and e.args.get("tier") == "host->device" for e in events):
        legend.append(Patch(facecolor=_COLORS["host->device"], label="copy host->device"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

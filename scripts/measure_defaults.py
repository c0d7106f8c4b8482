"""Are the defaults the fast setting? `threads` and `io_mode` defaults against every fixed choice, quiet and busy.

```
for load in (quiet, busy = one spinning process per usable core, started 1 s before and killed after):
    README command (`run models/moe-tiny --host-budget 25% ...`, 48 new tokens): wall time with --threads 0 (default,
        `threads="auto"`), 1, 2; interleaved reps
    `bench MODEL --scenario latency --budgets 25,100 --threads 0 --ablate <every threads x io_mode>`: batch-1 decode
        tok/s of the defaults and of each fixed setting, interleaved reps (the synthetic model under --ramlimit)
-> one JSON record (--out) and a markdown table per model: defaults / best fixed setting, per budget and load
```

Usage:
    python scripts/measure_defaults.py --out /tmp/defaults.json                       # shipped model only
    python scripts/measure_defaults.py --synth mixtral-8x7b --synth-layers 2 --out /tmp/defaults.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

from hf_moe_offload.integration.threads import usable_cores

SHIPPED = "models/moe-tiny"
README_RUN = [
    "run",
    SHIPPED,
    "--host-budget",
    "25%",
    "--prompt",
    "Fellow citizens, the state of the Union",
    "--prompt",
    "def parse_args(argv):",
    "--max-new-tokens",
    "48",
    "--json",
]


@contextlib.contextmanager
def load(kind: str):
    """Nothing for "quiet"; one spinning process per usable core for "busy"."""
    procs = []
    if kind == "busy":
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores())]
        time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def cli(*argv: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hf_moe_offload", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def readme_command(reps: int) -> dict:
    """Wall seconds of the README command per thread setting (0 = the default)."""
    out: dict = {}
    for _ in range(reps):
        for threads in ("0", "1", "2"):
            t = time.perf_counter()
            r = cli(*README_RUN, "--threads", threads)
            wall = time.perf_counter() - t
            if r.returncode:
                raise SystemExit(f"README command failed: {r.stderr[-2000:]}")
            out.setdefault(threads, []).append(wall)
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def grid(io_modes: list[str]) -> list[str]:
    return [f"threads={t}+io_mode={m}" for t in (1, 2) for m in io_modes]


def bench(model_args: list[str], budgets: str, io_modes: list[str], reps: int, ramlimit: bool) -> dict:
    """The shipped model runs with a warm page cache (as a user's second run does); the synthetic one cold, under a
    memory group of its budget (`--ramlimit`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        argv = [
            "bench",
            *model_args,
            "--scenario",
            "latency",
            "--budgets",
            budgets,
            "--threads",
            "0",
            "--baselines",
            "none",
            "--ablate",
            ",".join(grid(io_modes)),
            "--reps",
            str(reps),
            "--json-out",
            path,
            "--no-progress",
        ]
        argv += ["--ramlimit"] if ramlimit else ["--cache", "warm"]
        r = cli(*argv)
        if not os.path.exists(path):
            raise SystemExit(f"bench failed ({r.returncode}): {r.stderr[-3000:]}")
        record = json.load(open(path))
    out: dict = {}
    for name, res in record["results"]["latency"].items():
        if res.get("kind") != "offload":
            continue
        label = "defaults" if "[" not in name else name[name.index("[") :]
        out.setdefault(res["budget"], {})[label] = res.get("decode_tok_s")
    return out


def table(title: str, rows: dict) -> str:
    lines = [
        f"### {title}",
        "",
        "| budget | load | defaults tok/s | best fixed setting | its tok/s | defaults / best |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for (budget, kind), configs in rows.items():
        fixed = {k: v for k, v in configs.items() if k != "defaults" and v}
        best = max(fixed, key=fixed.get)
        d = configs.get("defaults") or 0.0
        lines.append(f"| {budget} | {kind} | {d:.2f} | `{best}` | {fixed[best]:.2f} | {d / fixed[best]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", help="also measure a synthetic model under --ramlimit (e.g. mixtral-8x7b)")
    ap.add_argument("--synth-layers", default="2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--synth-reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    record: dict = {"cores": usable_cores(), "readme_command_s": {}, "models": {}}
    models = [("shipped", [SHIPPED], ["fadvise", "direct", "cached"], args.reps, False)]
    if args.synth:
        synth = ["--synth", args.synth, "--synth-layers", args.synth_layers]
        models.append(
            (f"{args.synth} ({args.synth_layers} layers)", synth, ["fadvise", "direct"], args.synth_reps, True)
        )
    for kind in ("quiet", "busy"):
        with load(kind):
            record["readme_command_s"][kind] = readme_command(args.reps)
            for name, model_args, io_modes, reps, ramlimit in models:
                res = bench(model_args, "25,100", io_modes, reps, ramlimit)
                for budget, configs in res.items():
                    record["models"].setdefault(name, {})[f"{budget} {kind}"] = configs
        json.dump(record, open(args.out, "w"), indent=1)
    print("README command, wall s (threads: 0 = default 'auto'):", json.dumps(record["readme_command_s"]))
    for name, rows in record["models"].items():
        print(table(name, {tuple(k.split(" ")): v for k, v in rows.items()}))
        print()


if __name__ == "__main__":
    main()

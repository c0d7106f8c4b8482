#!/usr/bin/env python
"""The link `plan --world-size N` costs token dispatch over: latency and bandwidth of one all-to-all.

Starts `--ranks` local processes on gloo (127.0.0.1), times `all_to_all_single` of each message size (bytes each
rank sends in all), keeps the fastest of `--reps`, and fits `t(bytes) = latency + bytes / bandwidth` to the
smallest and the largest size. The defaults of `plan --link-latency` / `--link-bandwidth`
(`scheduling.expert_parallel.DEFAULT_LINK`) come from this script on the development machine; over a real network
pass your own (`--link-bandwidth 10Gbit`). Prints a table, then one JSON line.

    python scripts/measure_link.py --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 24)


def _worker(rank: int, world: int, port: int, reps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    best = {}
    for size in SIZES:
        send = torch.zeros(size // 4 // world * world, dtype=torch.float32)
        recv = torch.empty_like(send)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append(time.perf_counter() - t0)
        best[size] = min(times)
    if rank == 0:
        queue.put(best)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, (args.ranks, port, args.reps, queue), nprocs=args.ranks, start_method="spawn")
    best = queue.get()
    print(f"{'bytes sent per rank':>20} {'all-to-all us':>14} {'GB/s':>8}")
    for size, t in best.items():
        print(f"{size:>20} {1e6 * t:>14.1f} {size / t / 1e9:>8.2f}")
    small, large = min(best), max(best)
    bandwidth = (large - small) / max(best[large] - best[small], 1e-12)
    latency = max(0.0, best[small] - small / bandwidth)
    print(f"fit: latency {1e6 * latency:.1f} us, bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(json.dumps({"ranks": args.ranks, "latency_s": latency, "bandwidth_Bps": bandwidth, "best_s": best}))


if __name__ == "__main__":
    main()

"""Benchmark building blocks: random checkpoints (`synth`), honest memory and page-cache measurement (`sysmem`),
and the batch-1 decode benchmark against accelerate (`decode_bench`, `decode_report`).

Nothing is imported here: each module imports what it needs (`sysmem` only the standard library).
"""

__all__: list[str] = []

"""Benchmark building blocks: random checkpoints (`synth`), honest memory and page-cache measurement (`sysmem`),
and the batch-1 decode benchmark against accelerate (`decode_bench`, `decode_report`).

Nothing is imported here, so `import hf_moe_offload.bench.sysmem` stays free of torch and transformers.
"""

__all__: list[str] = []

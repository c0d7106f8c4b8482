"""Throughput mode: many prompts, grouped by routing similarity, each group generated as one batch.

```
prompts --layer-0 router on the prompt embeddings--> signatures (N, E) --group_sequences--> groups of <= batch_size
each group: left-padded batch -> model.generate (every MoE layer call loads each needed expert once and applies it
            to every token of every sequence routed to it: one load serves the whole group)
outputs returned in the input order, with the schedule's distinct-experts report
```
Grouping sequences that use the same experts lowers the distinct experts each batch loads (ExpertFlow's token
scheduler); the signature is the first MoE layer's router applied to the normalised token embeddings: cheap (no
forward pass) and only used for grouping, never for the outputs. `schedule="none"` keeps the input order.
"""

from __future__ import annotations

import torch

from ..adapters import describe_model
from ..scheduling.token_scheduler import TokenSchedule, group_sequences, routing_signature

__all__ = ["generate_many", "prompt_signatures"]


@torch.no_grad()
def prompt_signatures(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """`(N, E)` expert counts that the first MoE layer's router gives each prompt's embedded tokens."""
    first = describe_model(model).layers[0]
    if first.router is None:
        raise ValueError("the first MoE layer has no router module to compute routing signatures; use schedule='none'")
    embed = model.get_input_embeddings()
    hidden = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids.to(embed.weight.device)
        x = embed(ids)[0]
        hidden.append(x / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt().to(x.dtype))
    return routing_signature(first.router, hidden, first.num_experts, first.top_k)


def generate_many(
    model, tokenizer, prompts: list[str], batch_size: int = 8, schedule: str = "routing", **generate_kwargs
) -> tuple[list[torch.Tensor], TokenSchedule | None]:
    """Generate for every prompt in batches, grouped by routing similarity; outputs in input order.

    Args:
        model: a causal LM (offloaded or not).
        tokenizer: its tokenizer (needs a pad token; left padding is used).
        prompts: the prompts.
        batch_size: sequences per `generate` call.
        schedule: `"routing"` (group by routing signature) or `"none"` (input order).
        generate_kwargs: passed to `model.generate`.

    Returns:
        The new tokens of each prompt (1-D tensors, padding removed) and the schedule (None for `"none"`).

    Example:
        ```python
        outs, sched = generate_many(model, tok, prompts, batch_size=32, max_new_tokens=64, do_sample=False)
        print(sched.distinct_before, sched.distinct_after)
        ```
    """
    if schedule not in ("routing", "none"):
        raise ValueError(f"schedule: expected 'routing' or 'none', got {schedule!r}")
    if schedule == "routing" and len(prompts) > batch_size:
        sched = group_sequences(prompt_signatures(model, tokenizer, prompts), batch_size)
        groups = sched.groups
    else:
        sched = None
        groups = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results: list[torch.Tensor | None] = [None] * len(prompts)
    try:
        for group in groups:
            enc = tokenizer([prompts[i] for i in group], return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            width = enc["input_ids"].shape[1]
            for row, i in enumerate(group):
                results[i] = out[row, width:].cpu()
    finally:
        tokenizer.padding_side = side
    return results, sched

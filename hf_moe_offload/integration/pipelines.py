"""`pipeline("text-generation")(prompts, batch_size=N)` on an offloaded model: batches grouped by routing.

```
list of N prompts, batch_size B > 1, offloaded model
  --prompt_signatures (first MoE router on the embeddings)--> group_sequences --> full groups first, then the rest
  --the pipeline's own batching over the reordered list (consecutive B items = one group)--> outputs
  --outputs put back in input order
```
Grouping prompts that route to the same experts lowers the distinct experts each batch loads (the token scheduler
of `generate_many`); each prompt's output is what the pipeline gives it in any batch. Pass
`group_by_routing=False` to a call to keep the input order. Anything else (one prompt, chats, a model that is not
offloaded, batch size 1) goes to the pipeline unchanged. The wrapper is installed by the first offloaded load (so
that `import hf_moe_offload` does not import the pipelines) and removed by `hf_moe_offload.uninstall()`.
"""

from __future__ import annotations

import functools
import sys

from .batching import prompt_signatures

__all__ = ["install_pipeline_grouping", "uninstall_pipeline_grouping"]

_ORIGINAL_ATTR = "_hf_moe_offload_original_call"


def _pipeline_class():
    from transformers.pipelines.text_generation import TextGenerationPipeline

    return TextGenerationPipeline


def _grouped_order(pipe, prompts: list[str], batch_size: int) -> list[int]:
    from ..scheduling.token_scheduler import group_sequences

    sched = group_sequences(prompt_signatures(pipe.model, pipe.tokenizer, prompts), batch_size)
    groups = sorted(sched.groups, key=lambda g: (len(g) != batch_size, g[0]))  # the short group last
    return [i for g in groups for i in g]


def install_pipeline_grouping() -> None:
    """Wrap `TextGenerationPipeline.__call__` (idempotent; `uninstall_pipeline_grouping` restores it)."""
    cls = _pipeline_class()
    if _ORIGINAL_ATTR in cls.__dict__:
        return
    original = cls.__dict__["__call__"]

    @functools.wraps(original)
    def __call__(self, text_inputs, *args, group_by_routing: bool = True, **kwargs):
        batch_size = kwargs.get("batch_size") or getattr(self, "_batch_size", None) or 1
        offloaded = getattr(self.model, "offload_engine", None) is not None
        if not (
            group_by_routing
            and offloaded
            and batch_size > 1
            and isinstance(text_inputs, (list, tuple))
            and len(text_inputs) > batch_size
            and all(isinstance(t, str) for t in text_inputs)
            and self.tokenizer is not None
        ):
            return original(self, text_inputs, *args, **kwargs)
        order = _grouped_order(self, list(text_inputs), batch_size)
        outputs = original(self, [text_inputs[i] for i in order], *args, **kwargs)
        result = [None] * len(order)
        for pos, i in enumerate(order):
            result[i] = outputs[pos]
        return result

    setattr(cls, _ORIGINAL_ATTR, original)
    cls.__call__ = __call__


def uninstall_pipeline_grouping() -> None:
    """Restore `TextGenerationPipeline.__call__` (imports nothing when the pipelines were never imported)."""
    module = sys.modules.get("transformers.pipelines.text_generation")
    cls = getattr(module, "TextGenerationPipeline", None)
    if cls is not None and _ORIGINAL_ATTR in cls.__dict__:
        cls.__call__ = cls.__dict__[_ORIGINAL_ATTR]
        delattr(cls, _ORIGINAL_ATTR)

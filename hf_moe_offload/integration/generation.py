"""generate() integration: a LogitsProcessor marks the end of each decode step.

`model.generate` of an offloaded model that generates is wrapped (at instance level) so that each call starts a
new request for the predictors and appends `StepBoundaryProcessor` to the logits processors. The processor runs after the last layer of every step, the moment
to prefetch the first layers of the next step. It never changes the scores.
"""

from __future__ import annotations

import functools

import torch
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = ["StepBoundaryProcessor", "wrap_generate"]


class StepBoundaryProcessor(LogitsProcessor):
    def __init__(self, engine):
        self.engine = engine

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.engine.step_end()
        self.engine.stats.add("tokens_generated", input_ids.shape[0])
        return scores


def wrap_generate(model, engine) -> None:
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        engine.begin_request()
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(StepBoundaryProcessor(engine))
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate

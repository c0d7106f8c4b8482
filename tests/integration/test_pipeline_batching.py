"""pipeline("text-generation")(prompts, batch_size=N) on an offloaded model groups prompts by routing."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, pipeline

from hf_moe_offload.integration import pipelines
from hf_moe_offload.testing import char_tokenizer

PROMPTS = [
    "def parse(x):",
    "the union is",
    "import numpy",
    "fellow citizens",
    "for i in range",
    "we the people",
    "return None",
    "congress shall",
    "class Foo:",
    "in order to",
]
KW = dict(max_new_tokens=6, do_sample=False, return_full_text=False)


@pytest.fixture(scope="module")
def pipes(mixtral_dir):
    tok = char_tokenizer()
    tok.padding_side = "left"
    normal = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(mixtral_dir), tokenizer=tok)
    off = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"host_budget": "40%"})
    return normal, pipeline("text-generation", model=off, tokenizer=tok)


def test_batched_outputs_are_in_input_order_and_equal_each_prompt_alone(pipes, monkeypatch):
    normal, off = pipes
    seen = []
    original = pipelines._grouped_order

    def spy(pipe, prompts, batch_size):
        order = original(pipe, prompts, batch_size)
        seen.append(order)
        return order

    monkeypatch.setattr(pipelines, "_grouped_order", spy)
    batched = off(PROMPTS, batch_size=4, **KW)
    assert len(seen) == 1 and sorted(seen[0]) == list(range(len(PROMPTS)))
    alone = [normal(p, **KW) for p in PROMPTS]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]


def test_grouping_lowers_distinct_experts_and_full_groups_come_first(pipes):
    from hf_moe_offload.integration.batching import prompt_signatures
    from hf_moe_offload.scheduling.token_scheduler import distinct_per_group

    _, off = pipes
    order = pipelines._grouped_order(off, PROMPTS, 4)
    groups = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert [len(g) for g in groups] == [4, 4, 2]
    signatures = prompt_signatures(off.model, off.tokenizer, PROMPTS)
    plain = [list(range(i, min(i + 4, len(PROMPTS)))) for i in range(0, len(PROMPTS), 4)]
    assert sum(distinct_per_group(signatures, groups)) <= sum(distinct_per_group(signatures, plain))


def test_switch_off_and_pass_through(pipes, monkeypatch):
    normal, off = pipes
    calls = []
    monkeypatch.setattr(pipelines, "_grouped_order", lambda *a: calls.append(a) or list(range(len(a[1]))))
    off(PROMPTS, batch_size=4, group_by_routing=False, **KW)  # switched off
    off(PROMPTS[:3], batch_size=4, **KW)  # fewer prompts than a batch
    off(PROMPTS[0], **KW)  # one prompt
    normal(PROMPTS, batch_size=4, **KW)  # not offloaded
    assert calls == []


def test_uninstall_restores_the_pipeline():
    from transformers.pipelines.text_generation import TextGenerationPipeline

    import hf_moe_offload

    wrapped = TextGenerationPipeline.__call__
    hf_moe_offload.uninstall()
    try:
        assert TextGenerationPipeline.__call__ is not wrapped
        assert pipelines._ORIGINAL_ATTR not in TextGenerationPipeline.__dict__
    finally:
        hf_moe_offload.install()
        pipelines.install_pipeline_grouping()

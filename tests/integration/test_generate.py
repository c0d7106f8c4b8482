"""generate() and pipeline() on an offloaded model give what the normal model gives."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM, TextIteratorStreamer, pipeline

from hf_moe_offload.testing import char_tokenizer

SMALL = {"host_budget": "30%"}  # 4 of 16 experts: misses and evictions on every step


@pytest.fixture(scope="module")
def pair(mixtral_dir, mixtral_model):
    tok = char_tokenizer()
    tok.save_pretrained(mixtral_dir)
    off = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config=SMALL)
    return mixtral_model, off, tok


def _gen(model, **kw):
    torch.manual_seed(1234)
    return model.generate(**kw)


def test_greedy_sampling_beam(pair):
    ref, off, tok = pair
    enc = tok(["The quick brown fox"], return_tensors="pt")
    for kw in (
        dict(do_sample=False, max_new_tokens=10),
        dict(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=10),
        dict(num_beams=3, do_sample=False, max_new_tokens=8, early_stopping=True),
    ):
        assert torch.equal(_gen(ref, **enc, **kw), _gen(off, **enc, **kw)), kw
    s = off.offload_stats()
    assert s["misses"] > 0 and s["evictions"] > 0


def test_batched_prompts_with_left_padding(pair):
    ref, off, tok = pair
    tok.padding_side = "left"
    enc = tok(["Hi", "A much longer prompt here"], return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert torch.equal(ref.generate(**enc, **kw), off.generate(**enc, **kw))


def test_streamer_sees_the_same_text(pair):
    ref, off, tok = pair
    enc = tok("Stream me", return_tensors="pt")
    texts = []
    for model in (ref, off):
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        model.generate(**enc, max_new_tokens=8, do_sample=False, streamer=streamer)
        texts.append("".join(streamer))
    assert texts[0] == texts[1] and texts[0]


def test_pipeline_with_model_kwargs(pair, mixtral_dir):
    ref, _, tok = pair
    pipe = pipeline("text-generation", model=mixtral_dir, model_kwargs={"offload_config": SMALL}, device="cpu")
    assert hasattr(pipe.model, "offload_stats")
    ref_pipe = pipeline("text-generation", model=ref, tokenizer=tok, device="cpu")
    kw = dict(max_new_tokens=8, do_sample=False)
    assert pipe("Once upon", **kw)[0]["generated_text"] == ref_pipe("Once upon", **kw)[0]["generated_text"]
    assert pipe.model.offload_stats()["misses"] > 0


def test_concrete_class_and_json_offload_config(mixtral_dir, tmp_path, mixtral_model):
    path = tmp_path / "offload.json"
    path.write_text('{"host_budget": "40%", "policy": "lfu", "io_threads": 3}')
    model = MixtralForCausalLM.from_pretrained(mixtral_dir, offload_config=str(path))
    assert model.offload_engine.config.policy == "lfu"
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, mixtral_model(ids).logits, rtol=0, atol=1e-5)


def test_stats_reset(pair):
    _, off, tok = pair
    off.generate(**tok("reset", return_tensors="pt"), max_new_tokens=2, do_sample=False)
    assert off.offload_stats()["misses"] + off.offload_stats()["hits"] > 0
    off.reset_offload_stats()
    s = off.offload_stats()
    assert s["hits"] == s["misses"] == s["bytes_loaded"] == 0 and s["stall_seconds"] == 0.0
    for key in ("hits", "misses", "evictions", "bytes_loaded", "stall_seconds"):
        assert key in s


def test_auto_mode_plans_budgets_and_keeps_outputs(mixtral_dir, mixtral_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOE_OFFLOAD_CACHE", str(tmp_path))  # the measured profile is cached here
    off = AutoModelForCausalLM.from_pretrained(mixtral_dir, offload_config={"mode": "auto"})
    eng = off.offload_engine
    assert eng.config.host_budget.nbytes is not None  # the planner replaced the share by bytes
    assert eng.topology.max_top_k <= eng.host_slots <= sum(layer.num_experts for layer in eng.topology.layers)
    assert any(tmp_path.iterdir())
    ids = torch.arange(3, 13).view(1, -1)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(off.generate(ids, **kw), mixtral_model.generate(ids, **kw))


def test_generate_many_groups_by_routing_and_matches_each_prompt_alone(pair):
    from hf_moe_offload.integration.batching import generate_many

    ref, off, tok = pair
    prompts = ["aaaa bbbb", "zzzz yyyy xx", "aaaa abab", "zzzz zzzz", "hello", "zyzy zz", "abba", "q"]
    outs, sched = generate_many(off, tok, prompts, batch_size=3, max_new_tokens=6, do_sample=False)
    assert sorted(sched.permutation) == list(range(len(prompts)))
    assert sum(sched.distinct_after) <= sum(sched.distinct_before)
    for p, got in zip(prompts, outs):  # the same greedy tokens as running the prompt alone
        enc = tok(p, return_tensors="pt")
        alone = ref.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc.input_ids.shape[1] :]
        assert torch.equal(got[got != tok.pad_token_id][: len(alone)], alone), p
    outs2, none = generate_many(off, tok, prompts, batch_size=3, schedule="none", max_new_tokens=6, do_sample=False)
    assert none is None and all(torch.equal(a, b) for a, b in zip(outs, outs2))

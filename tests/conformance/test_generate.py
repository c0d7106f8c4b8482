"""generate() of an offloaded model equals the normal model's: every decoding strategy, cache and output option.

Each call is made on both models with `torch.manual_seed` set just before it, so sampled tokens are comparable;
token ids must be identical, scores and logits within 1e-4 (fp32). A family where transformers refuses a feature
(`no_assisted`) gets the same error from both models before the test skips. Tests that decode text use
char_tokenizer and suppress the ids it cannot decode (the tiny vocabulary is larger than its 98 ids).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from hf_moe_offload.testing import char_tokenizer

from ._cases import (
    CASES,
    PAD,
    VOCAB,
    assert_misses_and_evictions,
    assert_same,
    attention,
    no_assisted,
    padded_batch,
    token_ids,
)

pytestmark = pytest.mark.parametrize(("model_type", "layout"), [pytest.param(*c, id="-".join(c)) for c in CASES])

NEW = 4
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam_search": dict(num_beams=3, do_sample=False),
    "beam_sample": dict(num_beams=2, do_sample=True),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=3),
    "beam_search_sequences": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    "no_cache": dict(do_sample=False, use_cache=False),
    "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=2),
    "scores_and_logits": dict(do_sample=True, return_dict_in_generate=True, output_scores=True, output_logits=True),
    "hidden_states": dict(do_sample=False, return_dict_in_generate=True, output_hidden_states=True),
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _generate(model, **kw):
    torch.manual_seed(1234)
    return model.generate(**{"max_new_tokens": NEW, "pad_token_id": PAD, **kw})


def _prompt() -> dict:
    ids = token_ids(1, 8, seed=4)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _refused(case, kw: dict, reason: str) -> None:
    """transformers refuses `kw` for this family: the normal and the offloaded model fail alike, then skip."""
    errors = []
    for model in (case.normal, case.off):
        with pytest.raises(ValueError) as info:
            _generate(model, **_prompt(), **kw)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    pytest.skip(reason)


@pytest.mark.parametrize("mode", list(MODES))
def test_generate_matches_normal(cases, model_type, layout, mode):
    case = cases.get(model_type, layout)
    kw = MODES[mode]
    if mode == "prompt_lookup" and (reason := no_assisted(case.normal)):
        _refused(case, kw, reason)
    case.off.reset_offload_stats()
    ref = case.family.once(("generate", mode), lambda: _generate(case.normal, **_prompt(), **kw))
    assert_same(ref, _generate(case.off, **_prompt(), **kw))
    assert_misses_and_evictions(case.off)


@pytest.mark.parametrize("offloaded", ["main", "assistant"])
def test_assisted_decoding(cases, model_type, layout, offloaded):
    """The offloaded model with the normal one as assistant, and the other way round, equal normal + normal."""
    case = cases.get(model_type, layout)
    if reason := no_assisted(case.normal):
        _refused(case, dict(assistant_model=copy.deepcopy(case.normal)), reason)
    # A fresh assistant per call: assisted decoding tunes the assistant's generation config as it goes.
    ref = _generate(case.normal, **_prompt(), assistant_model=copy.deepcopy(case.normal), do_sample=False)
    if offloaded == "main":
        got = _generate(case.off, **_prompt(), assistant_model=copy.deepcopy(case.normal), do_sample=False)
    else:
        with case.offloaded() as assistant:
            got = _generate(case.normal, **_prompt(), assistant_model=assistant, do_sample=False)
            assert_misses_and_evictions(assistant)
    assert torch.equal(ref, got)
    assert torch.equal(ref, _generate(case.normal, **_prompt(), do_sample=False))


def test_inputs_embeds(cases, model_type, layout):
    case = cases.get(model_type, layout)
    prompt = _prompt()
    embeds = case.normal.get_input_embeddings()(prompt["input_ids"])
    kw = dict(inputs_embeds=embeds, attention_mask=prompt["attention_mask"], do_sample=False)
    ref = _generate(case.normal, **kw)
    assert ref.shape == (1, NEW)
    assert torch.equal(ref, _generate(case.off, **kw))


@pytest.mark.parametrize("mode", ["greedy", "beam_search", "num_return_sequences"])
def test_left_padded_batch(cases, model_type, layout, mode):
    case = cases.get(model_type, layout)
    ids, mask = padded_batch("left")
    kw = dict(input_ids=ids, attention_mask=mask, **MODES[mode])
    assert torch.equal(_generate(case.normal, **kw), _generate(case.off, **kw))


def test_attentions_eager(cases, model_type, layout):
    case = cases.get(model_type, layout)
    kw = dict(do_sample=False, return_dict_in_generate=True, output_attentions=True)
    with attention("eager", case.normal, case.off):
        ref = _generate(case.normal, **_prompt(), **kw)
        assert ref.attentions and ref.attentions[0]
        assert_same(ref, _generate(case.off, **_prompt(), **kw))


class _Count(LogitsProcessor):
    """A user's logits processor: counts its calls and bans one token."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores.index_fill(-1, torch.tensor([5]), -float("inf"))


def test_user_logits_processors_are_kept(cases, model_type, layout):
    """The step-boundary processor is appended to the user's list, never replaces it, never changes the scores."""
    case = cases.get(model_type, layout)
    counters, outs = [_Count(), _Count()], []
    for model, counter in zip((case.normal, case.off), counters):
        kw = dict(do_sample=False, return_dict_in_generate=True, output_scores=True)
        outs.append(_generate(model, **_prompt(), **kw, logits_processor=LogitsProcessorList([counter])))
    assert counters[0].calls == counters[1].calls == outs[0].sequences.shape[1] - 8  # once per new token
    assert_same(*outs)
    assert (outs[1].scores[0][:, 5] == -float("inf")).all()


@pytest.mark.parametrize("cache", [DynamicCache, StaticCache], ids=lambda c: c.__name__)
def test_cache_classes(cases, model_type, layout, cache):
    """A DynamicCache passed in, and `cache_implementation="static"`: the same cache class, the same tokens."""
    case = cases.get(model_type, layout)
    outs = []
    for model in (case.normal, case.off):
        static = cache is StaticCache
        kw = dict(cache_implementation="static") if static else dict(past_key_values=cache(config=model.config))
        kw.update(do_sample=False, return_dict_in_generate=True, output_scores=True)
        outs.append(_generate(model, **_prompt(), **kw))
        assert type(outs[-1].past_key_values) is cache
    assert_same(*outs)


def test_continue_from_past_key_values(cases, model_type, layout):
    """A second generate() resumes from the first one's cache and sequences."""
    case = cases.get(model_type, layout)
    outs = []
    for model in (case.normal, case.off):
        first = _generate(model, **_prompt(), do_sample=False, return_dict_in_generate=True)
        seq, cache = first.sequences, first.past_key_values
        resume = dict(input_ids=seq, attention_mask=torch.ones_like(seq), past_key_values=cache, do_sample=False)
        outs.append(_generate(model, **resume))
    assert outs[0].shape[1] > 8 + NEW or int(outs[0][0, -1]) in _eos(case.normal)  # resumed, or eos ended it
    assert torch.equal(*outs)


def _eos(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class _Collect(BaseStreamer):
    """Records every tensor generate() streams (the prompt first, then each new token)."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamers(cases, model_type, layout, tok):
    case = cases.get(model_type, layout)
    enc = tok(["stream me"], return_tensors="pt")
    kw = dict(do_sample=False, suppress_tokens=list(range(VOCAB, case.normal.config.vocab_size)))
    collected, texts = [], []
    for model in (case.normal, case.off):
        ids, text = _Collect(), TextIteratorStreamer(tok, skip_prompt=True)
        _generate(model, **enc, **kw, streamer=ids)
        _generate(model, **enc, **kw, streamer=text)
        collected.append(ids)
        texts.append("".join(text))
    assert collected[0].puts == collected[1].puts and 1 < len(collected[0].puts) <= 1 + NEW  # eos may stop it
    assert collected[1].ended
    assert texts[0] == texts[1] and texts[0]


def test_stop_strings(cases, model_type, layout, tok):
    """Stopping on a string the normal model generates at the second step stops both models there."""
    case = cases.get(model_type, layout)
    enc = tok(["stop here"], return_tensors="pt")
    width = enc.input_ids.shape[1]
    kw = dict(do_sample=False, suppress_tokens=list(range(VOCAB, case.normal.config.vocab_size)), tokenizer=tok)
    free = _generate(case.normal, **enc, **kw)
    stop = tok.decode(free[0, width + 1 : width + 2])
    ref = _generate(case.normal, **enc, **kw, stop_strings=[stop])
    off = _generate(case.off, **enc, **kw, stop_strings=[stop])
    assert torch.equal(ref, off)
    assert off.shape[1] <= width + 2 < free.shape[1]

"""`hf-moe-offload run`: `--chat` applies the tokenizer's chat template, decoding follows the model's
`generation_config` unless a flag overrides it, `--threads` sets torch's intra-op threads.

Runs the shipped model (`models/moe-tiny`) from copies in tmp_path whose tokenizer or
generation config is edited.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_moe_offload.cli.args import UsageError
from hf_moe_offload.cli.main import main as cli
from hf_moe_offload.cli.run import _generate_kwargs

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "moe-tiny"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
RUN = ["--max-new-tokens", "4", "--host-budget", "50%", "--json"]


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory):
    """A copy of the shipped model whose tokenizer has a chat template and whose generation config samples hot."""
    folder = tmp_path_factory.mktemp("moe-tiny-chat")
    shutil.copytree(SHIPPED, folder, dirs_exist_ok=True)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": TEMPLATE}))
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 50.0}))
    return str(folder)


def _run(capsys, *argv) -> dict:
    code = cli(["run", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)  # stdout holds exactly one JSON document


def _texts(record: dict) -> list[str]:
    return [r["text"] for r in record["results"]]


@pytest.mark.slow
def test_chat_applies_the_tokenizer_template(shipped_copy, capsys):
    chat = _run(capsys, shipped_copy, "--chat", "--prompt", "hi", "--greedy", *RUN)["results"][0]
    templated = "<user>hi</user><assistant>"
    plain = _run(capsys, shipped_copy, "--prompt", templated, "--greedy", *RUN)["results"][0]
    from transformers import AutoTokenizer

    expected = len(AutoTokenizer.from_pretrained(shipped_copy)(templated).input_ids)
    assert (
        chat["prompt_tokens"]
        == plain["prompt_tokens"]
        == expected
        > len(AutoTokenizer.from_pretrained(SHIPPED)("hi").input_ids)
    )
    assert chat["text"] == plain["text"] and chat["new_tokens"] == 4


def test_chat_without_a_template_fails_before_loading_the_model(capsys):
    assert cli(["run", str(SHIPPED), "--chat", "--prompt", "hi", *RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0], err


@pytest.mark.slow
def test_decoding_follows_the_generation_config_unless_a_flag_overrides_it(shipped_copy, capsys):
    prompts = ["--prompt", "The state of the Union", "--max-new-tokens", "8", "--host-budget", "50%", "--json"]
    # The copy's generation_config samples at temperature 50: two seeds give two texts, --greedy overrides it.
    hot = [_texts(_run(capsys, shipped_copy, *prompts, "--seed", s)) for s in (0, 1)]
    assert hot[0] != hot[1]
    greedy = _texts(_run(capsys, shipped_copy, *prompts, "--greedy", "--seed", "0"))
    # The shipped model's own generation_config is greedy: the default follows it, whatever the seed.
    assert _texts(_run(capsys, SHIPPED, *prompts, "--seed", "1")) == greedy


def _kwargs(**flags) -> dict:
    values = dict(max_new_tokens=8, do_sample=None, temperature=None, top_p=None, top_k=None)
    return _generate_kwargs(argparse.Namespace(**{**values, **flags}))


def test_sampling_flags_pass_only_what_the_user_set():
    assert _kwargs() == {"max_new_tokens": 8}  # generate() takes the rest from the generation_config
    assert _kwargs(do_sample=False) == {"max_new_tokens": 8, "do_sample": False}
    assert _kwargs(temperature=0.7) == {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7}
    assert _kwargs(do_sample=True, top_p=0.9, top_k=5) == {
        "max_new_tokens": 8,
        "do_sample": True,
        "top_p": 0.9,
        "top_k": 5,
    }
    with pytest.raises(UsageError, match="--greedy"):
        _kwargs(do_sample=False, top_k=5)


def test_threads_sets_torch_intra_op_threads(capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _run(capsys, SHIPPED, "--prompt", "a", "--threads", "1", "--max-new-tokens", "1", "--json")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

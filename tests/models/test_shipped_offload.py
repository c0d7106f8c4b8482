"""The shipped trained model (models/moe-tiny) offloaded: same tokens as the normal model, and on its learned
routing gate lookahead predicts the next layer well. Also the README's main command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow  # over 5 s on a 2-core CPU; still part of the default run

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "models", "moe-tiny")


def test_offloaded_shipped_model_matches_and_prefetches_well():
    tok = AutoTokenizer.from_pretrained(MODEL)
    ref = AutoModelForCausalLM.from_pretrained(MODEL)
    off = AutoModelForCausalLM.from_pretrained(MODEL, offload_config={"host_budget": "25%"})
    kw = dict(max_new_tokens=16, do_sample=False)
    for prompt in ("We the people of the United States", "import os\nimport sys\n\ndef main("):
        enc = tok(prompt, return_tensors="pt")
        assert torch.equal(off.generate(**enc, **kw), ref.generate(**enc, **kw)), prompt
    s = off.offload_stats()
    assert s["misses"] > 0 and s["evictions"] > 0
    assert s["prefetch_precision"] >= 0.6 and s["prefetch_used"] > 0, s


def test_readme_main_command():
    cmd = [
        sys.executable,
        "-m",
        "hf_moe_offload.cli.main",
        "run",
        MODEL,
        "--host-budget",
        "25%",
        "--prompt",
        "Fellow citizens",
        "--max-new-tokens",
        "8",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["results"][0]["new_tokens"] == 8 and record["results"][0]["text"]
    assert record["offload_stats"]["misses"] > 0

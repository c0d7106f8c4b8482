"""`offload_config=` works in programs that never import hf_moe_offload (the .pth start-up hook), and only there.

Each test runs a fresh interpreter of this environment, as a tool such as lm_eval or a server would be run.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "HF_MOE_OFFLOAD_AUTOLOAD"}
    full_env = {**base, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=full_env
    )


def _last_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_start_up_hook_is_armed_and_imports_nothing_heavy():
    """The hook file must be installed (`pip install -e .` or the wheel puts it in site-packages)."""
    out = _python(
        "import json, sys\n"
        "print(json.dumps({m: m in sys.modules for m in "
        "('_hf_moe_offload_autoload', 'hf_moe_offload', 'torch', 'transformers')}))"
    )
    found = _last_json(out)
    assert found["_hf_moe_offload_autoload"], (
        "hf_moe_offload_autoload.pth did not run at start-up: reinstall the package (pip install -e .)"
    )
    assert not (found["hf_moe_offload"] or found["torch"] or found["transformers"])


@pytest.mark.slow
def test_offload_config_without_an_import_loads_offloaded_and_uninstall_restores_transformers(mixtral_dir):
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, PreTrainedModel
folder = {mixtral_dir!r}
stub = PreTrainedModel.__dict__["from_pretrained"]
original = stub.__func__._hf_moe_offload_autoload_original
ref = AutoModelForCausalLM.from_pretrained(folder).eval()
after_plain = "hf_moe_offload" in sys.modules
model = AutoModelForCausalLM.from_pretrained(folder, offload_config='{{"host_budget": "50%"}}').eval()
x = torch.tensor([[1, 5, 9, 3, 7, 2]])
with torch.no_grad():
    diff = (model(x).logits - ref(x).logits).abs().max().item()
import hf_moe_offload
hooked = hf_moe_offload.is_installed()
hf_moe_offload.uninstall()
print(json.dumps({{"after_plain": after_plain, "imported": "hf_moe_offload" in sys.modules, "diff": diff,
    "misses": model.offload_stats()["misses"], "hooked": hooked,
    "restored": PreTrainedModel.__dict__["from_pretrained"] is original}}))
"""
    got = _last_json(_python(code))
    assert got["after_plain"] is False  # a load without offload_config does not import the package
    assert got["imported"] and got["hooked"] and got["misses"] > 0
    assert got["diff"] < 1e-5
    assert got["restored"]  # transformers' own method, not the stub


@pytest.mark.slow
def test_the_switch_turns_the_hook_off():
    code = (
        "import json, sys\nfrom transformers import PreTrainedModel\n"
        "f = PreTrainedModel.__dict__['from_pretrained'].__func__\n"
        "print(json.dumps({'module': '_hf_moe_offload_autoload' in sys.modules, "
        "'stub': hasattr(f, '_hf_moe_offload_autoload_original')}))"
    )
    assert _last_json(_python(code, HF_MOE_OFFLOAD_AUTOLOAD="0")) == {"module": False, "stub": False}

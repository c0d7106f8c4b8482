"""`hf_moe_offload._import_hook`: `import hf_moe_offload` stays light (no torch, no transformers) and still keeps its
promise: the hooks are installed by the time transformers defines `PreTrainedModel`, whichever import gets there
first. Each case runs in a fresh interpreter (this one has imported everything already)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = (
    "from transformers import PreTrainedModel\n"
    "assert '_hf_moe_offload_original_from_pretrained' in PreTrainedModel.__dict__, 'hooks not installed'\n"
)


def _run(code: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MOE_OFFLOAD_AUTOLOAD="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.mark.slow
def test_import_is_light_and_installs_when_transformers_loads_then_offloads():
    _run(
        "import sys\n"
        "import hf_moe_offload\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), 'import hf_moe_offload loaded torch'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(ROOT / 'models' / 'moe-tiny')!r}, "
        "offload_config={'host_budget': '50%'})\n"
        "assert model.offload_stats()['host_slots'] > 0\n" + INSTALLED + "print('ok')\n"
    )


@pytest.mark.slow
def test_installs_at_once_when_transformers_is_loaded_first():
    _run("import transformers.modeling_utils\nimport hf_moe_offload\n" + INSTALLED + "print('ok')\n")


@pytest.mark.slow
def test_installs_when_the_package_own_modules_load_transformers():
    """`hf_moe_offload.integration` (and `testing`) import `PreTrainedModel` themselves, mid-import."""
    _run(
        "import hf_moe_offload\nfrom hf_moe_offload.testing import build_tiny\n"
        + INSTALLED
        + "assert hf_moe_offload.is_installed()\nprint('ok')\n"
    )
    _run("import hf_moe_offload.integration\n" + INSTALLED + "print('ok')\n")

"""Hooks are exactly reversible, importing does not touch CUDA, and the layering rule holds."""

import ast
import pathlib
import subprocess
import sys

from transformers import PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

import hf_moe_offload

PKG = pathlib.Path(hf_moe_offload.__file__).parent
# Lower layers never import transformers: only these may.
MAY_IMPORT_TRANSFORMERS = {"adapters", "integration", "testing", "cli", "bench"}
ORDER = [
    "errors",
    "registry",
    "config",
    "adapters",
    "storage",
    "cache",
    "prefetch",
    "scheduling",
    "execution",
    "integration",
    "testing",
    "bench",
    "cli",
]


def test_uninstall_restores_the_original_method_and_install_is_idempotent():
    hf_moe_offload.install()
    wrapped = PreTrainedModel.__dict__["from_pretrained"]
    original = PreTrainedModel.__dict__["_hf_moe_offload_original_from_pretrained"]
    hf_moe_offload.uninstall()
    try:
        assert PreTrainedModel.__dict__["from_pretrained"] is original
        assert not hf_moe_offload.is_installed()
    finally:
        hf_moe_offload.install()
    assert hf_moe_offload.is_installed()
    assert PreTrainedModel.__dict__["from_pretrained"] is not wrapped  # a fresh wrapper around the same original
    assert PreTrainedModel.__dict__["_hf_moe_offload_original_from_pretrained"] is original
    assert "hf_moe_offload" in ExpertsInterface._global_mapping


def test_uninstall_in_a_fresh_process_unregisters_everything():
    code = (
        "import hf_moe_offload\nfrom transformers import PreTrainedModel\n"
        "from transformers.integrations.moe import ExpertsInterface\n"
        "orig = PreTrainedModel.__dict__['_hf_moe_offload_original_from_pretrained']\n"
        "hf_moe_offload.uninstall()\n"
        "assert PreTrainedModel.__dict__['from_pretrained'] is orig\n"
        "assert 'hf_moe_offload' not in ExpertsInterface._global_mapping\nprint('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_import_does_not_initialise_cuda():
    code = "import torch, hf_moe_offload; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
            elif node.level >= 1:
                parts = path.relative_to(PKG).parts[:-1]
                base = list(parts[: len(parts) - (node.level - 1)])
                names.add("hf_moe_offload." + ".".join(base + ([node.module] if node.module else [])))
    return names


def _layer(module_path: str) -> str:
    parts = module_path.split(".")
    return parts[1].removesuffix(".py") if len(parts) > 1 else ""


def test_layering_is_one_directional():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        layer = rel.parts[0].removesuffix(".py")
        if layer not in ORDER:
            continue
        for name in _imports(path):
            if name.split(".")[0] == "transformers" and layer not in MAY_IMPORT_TRANSFORMERS:
                bad.append(f"{rel} imports {name}")
            if name.startswith("hf_moe_offload."):
                target = _layer(name)
                if target in ORDER and ORDER.index(target) > ORDER.index(layer):
                    bad.append(f"{rel} ({layer}) imports upward: {name}")
    assert not bad, "\n".join(bad)

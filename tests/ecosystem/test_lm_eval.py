"""The real lm-evaluation-harness CLI, which never imports hf_moe_offload, evaluates the shipped model offloaded.

`lm_eval --model hf --model_args pretrained=models/moe-tiny,offload_config=<file>` on a local loglikelihood task
(YAML + JSONL written here, no download) gives the normal model's loglikelihoods, and lm_eval's own record of the
model shows the experts were not loaded with it.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "moe-tiny")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install -e '.[test]' or '.[eval]' brings it)",
)

TASK = """task: moe_tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [
    {"context": "Fellow citizens, the state of the", "continuation": " Union"},
    {"context": "def parse_args(argv):\n    ", "continuation": "return parser.parse_args(argv)"},
    {"context": "We the people", "continuation": " of the United States"},
    {"context": "import numpy as", "continuation": " np"},
]


def _lm_eval() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    return [script] if os.path.exists(script) else [shutil.which("lm_eval") or "lm_eval"]


def _run(tmp_path, name: str, model_args: str) -> tuple[dict, list[dict]]:
    out_dir = tmp_path / name
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = ["--model", "hf", "--model_args", model_args, "--device", "cpu", "--batch_size", "2"]
    args += ["--tasks", "moe_tiny_loglikelihood", "--include_path", str(tmp_path / "task")]
    args += ["--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(_lm_eval() + args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    (samples,) = glob.glob(str(out_dir / "**" / "samples_*.jsonl"), recursive=True)
    with open(samples, encoding="utf-8") as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    with open(results, encoding="utf-8") as f:
        return json.load(f), rows


@pytest.mark.slow
def test_lm_eval_cli_with_offload_config_gives_the_normal_models_loglikelihoods(tmp_path):
    (tmp_path / "task").mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (tmp_path / "task" / "moe_tiny_loglikelihood.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    config = tmp_path / "offload.json"  # a file: lm_eval splits --model_args on commas
    config.write_text(json.dumps({"host_budget": "25%", "prefetch": "gate_lookahead"}), encoding="utf-8")

    base = f"pretrained={MODEL},dtype=float32"
    normal, normal_rows = _run(tmp_path, "normal", base)
    offloaded, offloaded_rows = _run(tmp_path, "offloaded", f"{base},offload_config={config}")

    assert [r["doc_id"] for r in offloaded_rows] == list(range(len(DOCS)))
    for a, b in zip(normal_rows, offloaded_rows):
        (ll_a, greedy_a), (ll_b, greedy_b) = a["filtered_resps"][0], b["filtered_resps"][0]
        assert float(ll_b) == pytest.approx(float(ll_a), rel=1e-5, abs=1e-5), (a["doc"], ll_a, ll_b)
        assert greedy_a == greedy_b
    # lm_eval counts the parameters of the model it evaluated: the experts (78% of them) stayed on disk.
    assert offloaded["config"]["model_num_parameters"] < 0.5 * normal["config"]["model_num_parameters"]

#!/usr/bin/env bash
# What a `pip install hf-moe-offload` user gets: build the wheel (not editable), install it with torch in a fresh
# virtual environment, then, from outside the checkout, run the README's main job on the model shipped inside the
# wheel, check that a program which never imports the package gets offload_config= (the .pth hook), and that
# py.typed, the licence and the classifiers are installed. Prints one JSON line at the end.
#
#   scripts/wheel_smoke.sh            # a temporary folder, removed afterwards
#   WHEEL_SMOKE_DIR=/tmp/ws scripts/wheel_smoke.sh   # keep the wheel and the venv there
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ -n "${WHEEL_SMOKE_DIR:-}" ]; then
    WORK="$WHEEL_SMOKE_DIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
start=$(date +%s)
rm -rf "$WORK/dist" "$WORK/venv" "$WORK/src"
# Build from a copy of the files git knows (tracked or not ignored): a stale build/ folder cannot leak into the wheel.
SRC="$ROOT"
if git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1; then
    SRC="$WORK/src"
    mkdir -p "$SRC"
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | tar -C "$ROOT" --null -T - --ignore-failed-read -cf - | tar -C "$SRC" -xf -
fi
"$PYTHON" -m pip wheel --no-deps -q -w "$WORK/dist" "$SRC"
WHEEL="$(ls "$WORK"/dist/hf_moe_offload-*.whl)"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q torch==2.13.0 "$WHEEL"
cd "$WORK"  # away from the checkout: only the installed wheel can be imported
export HF_HUB_OFFLINE=1
# README main job, on the model shipped in the wheel:
MODEL="$("$WORK/venv/bin/python" -c 'from hf_moe_offload.shipped import shipped_model_path; print(shipped_model_path())')"
"$WORK/venv/bin/hf-moe-offload" run "$MODEL" --host-budget 25% --max-new-tokens 16 \
    --prompt "Fellow citizens, the state of the Union" --prompt "def parse_args(argv):"
# A program that never imports hf_moe_offload (as lm_eval): offloaded, same greedy text as the normal model.
"$WORK/venv/bin/python" - "$MODEL" "$WHEEL" "$start" <<'PY'
import json, pathlib, sys, time
from importlib.metadata import distribution

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, wheel, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok("Fellow citizens, the state of the", return_tensors="pt")
normal = AutoModelForCausalLM.from_pretrained(model_dir)
assert "hf_moe_offload" not in sys.modules, "a load without offload_config imported the package"
offloaded = AutoModelForCausalLM.from_pretrained(model_dir, offload_config={"host_budget": "25%"})
with torch.no_grad():
    want = normal.generate(**ids, max_new_tokens=16, do_sample=False)
    got = offloaded.generate(**ids, max_new_tokens=16, do_sample=False)
assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
stats = offloaded.offload_stats()
assert stats["misses"] > 0, stats

import hf_moe_offload

pkg = pathlib.Path(hf_moe_offload.__file__).parent
assert "site-packages" in str(pkg), f"imported from {pkg}, not from the installed wheel"
assert (pkg / "py.typed").is_file(), "py.typed is missing"
dist = distribution("hf-moe-offload")
meta = dist.metadata
assert any(f.name == "LICENSE" and "Apache License" in f.read_text() for f in dist.files), "LICENSE is missing"
classifiers = meta.get_all("Classifier") or []
licence = meta.get("License-Expression") or meta.get("License")
assert licence and "Apache" in licence, licence
assert "Typing :: Typed" in classifiers and any("Apache" in c for c in classifiers), classifiers
print(json.dumps({
    "wheel": pathlib.Path(wheel).name, "wheel_bytes": pathlib.Path(wheel).stat().st_size,
    "text": tok.decode(got[0][ids["input_ids"].shape[1]:]), "misses": stats["misses"], "license": licence,
    "classifiers": len(classifiers), "seconds": round(time.time() - start, 1),
}))
PY

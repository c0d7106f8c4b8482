"""The conformance suite's cases: families, tiny models, checkpoints, budgets, inputs and how outputs are compared.

```
FAMILIES --matrix_config + sharpen_routers (seeded)--> normal fp32 causal LM, built once per family
  x LAYOUTS --save_checkpoint--> Case: checkpoint folder, host budget = (top_k + 1) experts' bytes
Case.off                  the shared offloaded fp32 causal LM of the case (loaded once, closed at session end)
Case.offloaded(cls, ...)  a fresh offloaded load of any class, closed when the `with` block ends
assert_same(ref, off)     nested outputs compared: tensors within the dtype's tolerance, structure exactly
```
A budget of top_k + 1 experts makes every forward miss and evict, so each comparison runs through the cache.
What transformers itself does not support for a family is data (`NO_PACKED`, `NO_ROUTER`, `PREFIX_MISMATCH`, and
transformers' own class flags, read by `no_sdpa` and `no_assisted`): a test that meets such an entry asserts that the
normal model has the same limitation before it skips, so a change in transformers shows up as a failure, never as
a silent skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_moe_offload.adapters import describe_model
from hf_moe_offload.adapters.discovery import discover_moe_families
from hf_moe_offload.integration import inspect_checkpoint
from hf_moe_offload.integration.plan import meta_model
from hf_moe_offload.testing import LAYOUTS, matrix_types, save_checkpoint, sharpen_routers, xfail_reason
from hf_moe_offload.testing.matrix import matrix_config

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES_ENV",
    "FAMILIES",
    "LAYOUTS",
    "CASES",
    "TOL",
    "PAD",
    "VOCAB",
    "no_sdpa",
    "NO_PACKED",
    "NO_ROUTER",
    "no_assisted",
    "PREFIX_MISMATCH",
    "Family",
    "Case",
    "CaseStore",
    "task_classes",
    "token_ids",
    "padded_batch",
    "assert_same",
    "assert_misses_and_evictions",
    "attention",
]

DEFAULT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "dbrx", "phimoe", "jamba")
FAMILIES_ENV = "HF_MOE_OFFLOAD_CONFORMANCE_FAMILIES"


def _families() -> tuple[str, ...]:
    """`DEFAULT_FAMILIES`, or what `$HF_MOE_OFFLOAD_CONFORMANCE_FAMILIES` names: model types separated by commas, or
    `all` for every causal-LM MoE type of the fidelity matrix that offloads exactly (a long run, not CI's)."""
    value = os.environ.get(FAMILIES_ENV, "").strip()
    if value == "all":
        causal = {f.model_type for f in discover_moe_families() if f.causal_lm}
        return tuple(t for t in matrix_types() if t in causal and not any(xfail_reason(t, lay) for lay in LAYOUTS))
    return tuple(t.strip() for t in value.split(",") if t.strip()) or DEFAULT_FAMILIES


FAMILIES = _families()
CASES = [(mt, layout) for mt in FAMILIES for layout in LAYOUTS]

# (atol, rtol) of offloaded vs normal, same dtype. fp32: the same math in another order (per-expert loop vs
# grouped_mm). bf16 / fp16: the normal model adds the k expert outputs in the low dtype, the expert loop in the
# promoted dtype (as transformers' own eager path does), so they differ by an ulp or two of the largest logit.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
PAD = 1  # char_tokenizer's <pad>
VOCAB = 98  # char_tokenizer's ids (3 specials + printable ASCII); every input id is below it


# What transformers itself cannot do. Where transformers has a flag for it, the flag is the data; the tests assert
# that the normal model fails the same way before they skip.
def no_sdpa(model: PreTrainedModel) -> str | None:
    """Why `model` cannot run sdpa attention in transformers, or None."""
    if type(model)._supports_sdpa:
        return None
    return (
        f"{type(model).__name__} has _supports_sdpa = False in transformers: set_attn_implementation('sdpa') "
        f"raises ValueError"
    )


def no_assisted(model: PreTrainedModel) -> str | None:
    """Why transformers refuses assisted generation and prompt lookup for `model`, or None."""
    if not type(model)._is_stateful:
        return None
    return (
        f"{type(model).__name__} is stateful (_is_stateful = True: recurrent layers whose cache cannot be cropped): "
        f"transformers refuses assisted generation and prompt lookup ('assisted generation is not supported with "
        f"stateful models')"
    )


# model_type -> why transformers does not honour a padding-free (packed) batch for it.
NO_PACKED = {
    "gpt_oss": "GptOssModel builds its causal masks without position_ids, so transformers never detects packed "
    "sequences: tokens attend across the packing boundary",
    "jamba": "Jamba's Mamba layers carry their recurrent state across the packing boundary (position_ids only "
    "reach the attention masks)",
}
# model_type -> why its MoE layers have no router module the topology can use (hooks watch the blocks only).
NO_ROUTER = {
    "jetmoe": "JetMoE's router (JetMoeTopKGating) is a child of the experts module itself, not of its parent, and "
    "returns dispatch indices rather than logits: the topology records no router",
}
# (model_type, auto class) -> why that head cannot load a causal-LM checkpoint at all.
PREFIX_MISMATCH = {
    ("qwen3_moe", "AutoModelForQuestionAnswering"): "Qwen3MoeForQuestionAnswering has base_model_prefix "
    "'transformer' while the checkpoint's keys start with 'model.': the normal load reports every weight MISSING "
    "(a random model); the offloaded load finds no experts and raises CorruptCheckpointError",
    ("qwen3_next", "AutoModelForQuestionAnswering"): "Qwen3NextForQuestionAnswering has base_model_prefix "
    "'transformer' (as Qwen3-MoE's): the normal load loads nothing, the offloaded one raises CorruptCheckpointError",
}


@functools.cache
def _auto_classes() -> tuple[tuple[str, type, dict], ...]:
    """Every `AutoModel*` class of transformers with its model-type -> class-name mapping (listing transformers'
    lazy module costs a third of a second: once)."""
    out = []
    for name in sorted(dir(transformers)):
        if name.startswith("AutoModel"):
            auto = getattr(transformers, name)
            names = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
            if isinstance(names, dict):
                out.append((name, auto, names))
    return tuple(out)


def task_classes(model_type: str) -> list[tuple[str, type, type]]:
    """`(auto class name, auto class, concrete class)` for every Auto mapping of transformers that holds the model
    type of `model_type`'s causal-LM checkpoint: the base model, the causal LM and each task head, discovered, not
    listed. The checkpoint's type is the causal LM's config type (a multimodal type such as `llama4` saves the
    text model, `llama4_text`, whose classes are the ones that can load it)."""
    causal = next(names[model_type] for name, _, names in _auto_classes() if name == "AutoModelForCausalLM")
    model_type = getattr(transformers, causal).config_class.model_type
    found = [(name, auto, names.get(model_type)) for name, auto, names in _auto_classes()]
    return [(name, auto, getattr(transformers, cls)) for name, auto, cls in found if cls]


def token_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """`(rows, length)` random ids in `[3, VOCAB)`: no special token, every one decodable by char_tokenizer."""
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(side: str, long: int = 8, short: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, `long` tokens and `short` tokens padded with PAD on `side` ("left" or "right"): ids, mask."""
    full = token_ids(2, long, seed)
    ids, mask = full.clone(), torch.ones_like(full)
    pad = slice(0, long - short) if side == "left" else slice(short, long)
    ids[1, pad], mask[1, pad] = PAD, 0
    return ids, mask


@dataclass
class Family:
    """The normal model of one family (fp32, eval) and results computed once for both layouts."""

    model_type: str
    normal: PreTrainedModel
    memo: dict = field(default_factory=dict)

    def once(self, key, fn):
        """`fn()` computed once per family under `key` (normal results do not depend on the layout)."""
        if key not in self.memo:
            self.memo[key] = fn()
        return self.memo[key]


class Case:
    """One family in one checkpoint layout, with the budget that forces misses and evictions."""

    def __init__(self, family: Family, layout: str, folder: str):
        self.family, self.layout, self.folder = family, layout, folder
        self.model_type, self.normal = family.model_type, family.normal
        save_checkpoint(self.normal, folder, layout)
        topology = describe_model(self.normal)
        self.top_k = topology.max_top_k
        total = sum(layer.num_experts for layer in topology.layers)
        assert self.top_k + 1 < total, f"{self.model_type}: {total} experts cannot force evictions"
        self._budgets: dict[torch.dtype, int] = {}
        self._off: PreTrainedModel | None = None
        self._open: list[PreTrainedModel] = []

    def __repr__(self) -> str:
        return f"Case({self.model_type}-{self.layout})"

    def budget(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of top_k + 1 experts in `dtype` (a slot holds an expert in the dtype the model computes in)."""
        if dtype not in self._budgets:
            meta = meta_model(type(self.normal), self.normal.config, {"dtype": dtype})
            self._budgets[dtype] = (self.top_k + 1) * inspect_checkpoint(meta, self.folder)[1].slot_nbytes
        return self._budgets[dtype]

    def config(self, dtype: torch.dtype = torch.float32, **extra) -> dict:
        return {"host_budget": self.budget(dtype), "device": "cpu", **extra}

    def load(self, cls=AutoModelForCausalLM, dtype: torch.dtype = torch.float32, **config) -> PreTrainedModel:
        """A fresh offloaded load with room for top_k + 1 experts (the caller closes it, or `close()` does)."""
        model = cls.from_pretrained(self.folder, offload_config=self.config(dtype, **config), dtype=dtype).eval()
        self._open.append(model)
        assert model.offload_engine.host_slots == self.top_k + 1, model.offload_engine.host_slots
        return model

    @contextlib.contextmanager
    def offloaded(self, cls=AutoModelForCausalLM, dtype: torch.dtype = torch.float32, **config):
        model = self.load(cls, dtype, **config)
        try:
            yield model
        finally:
            model.offload_engine.close()
            self._open.remove(model)

    @property
    def off(self) -> PreTrainedModel:
        """The shared offloaded fp32 causal LM of this case; a test that changes it restores it."""
        if self._off is None:
            self._off = self.load()
        return self._off

    def close(self) -> None:
        for model in self._open:
            model.offload_engine.close()
        self._open.clear()


class CaseStore:
    """Families and cases built on first use and kept for the session (tiny: a few hundred KB each)."""

    def __init__(self, root: str):
        self.root = root
        self._families: dict[str, Family] = {}
        self._cases: dict[tuple[str, str], Case] = {}

    def family(self, model_type: str) -> Family:
        if model_type not in self._families:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(matrix_config(model_type), dtype=torch.float32)
            sharpen_routers(model)
            self._families[model_type] = Family(model_type, model.eval())
        return self._families[model_type]

    def get(self, model_type: str, layout: str) -> Case:
        key = (model_type, layout)
        if key not in self._cases:
            folder = os.path.join(self.root, f"{model_type}-{layout}")
            self._cases[key] = Case(self.family(model_type), layout, folder)
        return self._cases[key]

    def close(self) -> None:
        for case in self._cases.values():
            case.close()


def assert_same(ref, off, dtype: torch.dtype = torch.float32, path: str = "out", skip=("past_key_values",)) -> None:
    """`off` has `ref`'s structure (same keys, lengths, Nones) and its tensors match within `TOL[dtype]`
    (integer tensors exactly). Cache objects under `skip` keys are not compared; other cache objects (transformers
    5.24's `cache` output) only by type."""
    if isinstance(ref, dict):  # ModelOutput included
        assert isinstance(off, dict), f"{path}: {type(off).__name__} is not a {type(ref).__name__}"
        keys, got = [k for k in ref.keys() if k not in skip], [k for k in off.keys() if k not in skip]
        assert got == keys, f"{path}: keys {got} != {keys}"
        for k in keys:
            assert_same(ref[k], off[k], dtype, f"{path}.{k}", skip)
    elif isinstance(ref, (tuple, list)):
        assert isinstance(off, (tuple, list)) and len(off) == len(ref), f"{path}: length {len(off)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ref, off)):
            assert_same(a, b, dtype, f"{path}[{i}]", skip)
    elif torch.is_tensor(ref):
        assert torch.is_tensor(off), f"{path}: {type(off).__name__} is not a tensor"
        assert off.shape == ref.shape and off.dtype == ref.dtype, (
            f"{path}: {off.shape}/{off.dtype} != {ref.shape}/{ref.dtype}"
        )
        if ref.is_floating_point():
            atol, rtol = TOL[dtype]
            torch.testing.assert_close(off, ref, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(off, ref), f"{path}: {off.tolist()} != {ref.tolist()}"
    elif isinstance(ref, transformers.Cache):
        assert type(off) is type(ref), f"{path}: {type(off).__name__} is not a {type(ref).__name__}"
    else:
        assert off == ref, f"{path}: {off!r} != {ref!r}"


def assert_misses_and_evictions(model: PreTrainedModel) -> None:
    stats = model.offload_stats()
    assert stats["misses"] > 0 and stats["evictions"] > 0, f"the budget did not force the cache: {stats}"


@contextlib.contextmanager
def attention(impl: str, *models: PreTrainedModel):
    """Run `models` with attention implementation `impl`, then restore what each had."""
    before = [m.config._attn_implementation for m in models]
    try:
        for m in models:
            m.set_attn_implementation(impl)
        yield
    finally:
        for m, b in zip(models, before):
            m.set_attn_implementation(b)

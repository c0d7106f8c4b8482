"""`save_pretrained` of an offloaded model: a complete checkpoint, experts streamed from the source files.

```
original save_pretrained(dir)        every weight that is in memory (experts are not parameters: left out)
for each MoE layer, each weight:     read expert 0..E-1 through the store into one slot -> one [E, ...] tensor
                                     -> model-experts-<layer>.safetensors under the model's state-dict names
model.safetensors.index.json         written (or extended) so that every key maps to its file
```
At most one layer's weight is in memory at a time, never all experts. The result loads with and without
`offload_config` and gives the same outputs. What cannot be saved faithfully is refused with
`UnsupportedFeatureError` before anything is written: non-safetensors serialisation, a custom `state_dict=`, a
pre-quantized source (its experts would be stored dequantized under a quantization config that says otherwise),
`push_to_hub`, and saving into the folder the experts are read from.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..adapters import STRIPPED_ATTR
from ..errors import UnsupportedFeatureError
from ..storage import ExpertStore, read_header, slot_views

__all__ = ["save_offloaded", "EXPERT_FILE"]

EXPERT_FILE = "model-experts-{:05d}.safetensors"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _refuse(reason: str) -> None:
    raise UnsupportedFeatureError(
        f"save_pretrained of an offloaded model: {reason}. Save with the defaults into a new folder, or load the "
        f"model without offload_config to save it another way"
    )


def _check(engine, save_directory: str, kwargs: dict) -> None:
    if kwargs.get("safe_serialization") is False:
        _refuse("only safetensors serialisation is supported (safe_serialization=False was given)")
    if kwargs.get("state_dict") is not None:
        _refuse("a custom state_dict= would leave the experts out")
    if kwargs.get("push_to_hub"):
        _refuse("push_to_hub=True is not supported; save to a folder, then upload it")
    if engine.plan.quantization is not None:
        _refuse(f"the source checkpoint is quantized ({engine.plan.quantization.get('quant_method')})")
    if engine.plan.shard is not None:
        _refuse(
            f"under expert parallelism each rank holds only its own experts (ep_size={engine.plan.shard.size}); "
            f"save from one process loaded without distributed_config"
        )
    if os.path.realpath(save_directory) == os.path.realpath(engine.folder):
        _refuse(f"{save_directory} is the folder the experts are read from")
    for layer in engine.topology.layers:
        if any(p.stored_experts not in (0, layer.num_experts) for p in layer.params):
            _refuse(f"{layer.module_name} stores extra non-routed experts that are not read")


def _expert_tensors(engine, store: ExpertStore, layer, slot: torch.Tensor) -> dict[str, torch.Tensor]:
    """State-dict key -> tensor of every offloaded weight of `layer`, read expert by expert through `slot`."""
    shapes = layer.module.__dict__[STRIPPED_ATTR]  # name -> (full shape, dtype) the module had
    keys = layer.adapter.expert_keys(layer.module)  # one module per expert: per-expert keys
    out: dict[str, torch.Tensor] = {}
    full = {}
    for p in layer.params:
        if keys is None:
            shape, dtype = shapes[p.name]
            full[p.name] = torch.empty(shape, dtype=dtype)
    for e in range(layer.num_experts):
        store.read_into(layer.layer, e, slot)
        for name, w in slot_views(slot, engine.layout, layer.layer).items():
            if keys is None:
                full[name].view(layer.num_experts, *w.shape)[e].copy_(w)
            else:
                out[layer.param_key(keys[name][e])] = w.clone()
    out.update({layer.param_key(name): t for name, t in full.items()})
    return out


def _write_index(save_directory: str, expert_files: dict[str, str]) -> None:
    index_path = os.path.join(save_directory, _INDEX)
    single = os.path.join(save_directory, _SINGLE)
    if os.path.isfile(single):  # one file: becomes a shard of a (new) index, so that loaders read every file
        shard = "model-00001-of-00001.safetensors"
        os.replace(single, os.path.join(save_directory, shard))
        weight_map = dict.fromkeys(read_header(os.path.join(save_directory, shard)).tensors, shard)
        index = {"metadata": {}, "weight_map": weight_map}
    else:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    index["weight_map"].update(expert_files)
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def save_offloaded(model, engine, original_save, save_directory: str | os.PathLike, *args, **kwargs):
    """Body of an offloaded model's `save_pretrained` (see the module docstring)."""
    save_directory = os.fspath(save_directory)
    _check(engine, save_directory, kwargs)
    result = original_save(save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return result
    slot = torch.empty(engine.layout.slot_nbytes, dtype=torch.uint8)
    expert_files: dict[str, str] = {}
    # The checkpoint's experts at full precision, whatever precision the cache holds (expert_dtype)
    store = ExpertStore(engine.layout, engine.config.io_mode)
    try:
        for layer in engine.topology.layers:
            name = EXPERT_FILE.format(layer.layer)
            tensors = _expert_tensors(engine, store, layer, slot)
            save_file(tensors, os.path.join(save_directory, name), metadata={"format": "pt"})
            expert_files.update(dict.fromkeys(tensors, name))
            del tensors
    finally:
        store.close()
    _write_index(save_directory, expert_files)
    return result

"""Prepared quantized experts on disk (a *sidecar*), written once by `hf-moe-offload prepare`, never required.

```
<model>/hf_moe_offload_experts/int4/          (or a folder the user names; the model's own files are never touched)
    manifest.json                              format, expert_dtype, packing per layer, source files (size, mtime),
                                               quantizer (optimum-quanto, torch versions)
    experts-L000.safetensors ...               one file per MoE layer: "<expert>.<weight>.q", "<expert>.<weight>.scale"
```
Each packed part is stored as the slot holds it, so a miss reads it straight into the slot: 2x (int8) to 3.6x
(int4) fewer bytes than the checkpoint's bf16. `open_sidecar` accepts a sidecar only when it was made from these
checkpoint files (same sizes and mtimes), with the packing this load plans, by a torch whose int4 packing is the
same; anything else is refused with `SidecarError` and the command that rebuilds it, never read silently.
"""

from __future__ import annotations

import json
import os
from importlib import metadata

import torch

from ..errors import SidecarError
from ..precision import PackedSpec
from .encoding import encode_expert
from .layout import ExpertLayout, Piece
from .reader import ExpertStore, slot_views
from .safetensors_file import read_header

__all__ = ["SIDECAR_DIR", "MANIFEST", "default_sidecar_folder", "write_sidecar", "open_sidecar"]

SIDECAR_DIR = "hf_moe_offload_experts"
MANIFEST = "manifest.json"
_FORMAT, _VERSION = "hf_moe_offload.expert_sidecar", 1


def default_sidecar_folder(model_folder: str, expert_dtype: str) -> str:
    return os.path.join(model_folder, SIDECAR_DIR, expert_dtype)


def _layer_file(layer: int) -> str:
    return f"experts-L{layer:03d}.safetensors"


def _sources(dense: ExpertLayout) -> dict[str, dict[str, int]]:
    """The checkpoint files the experts come from: name -> size and mtime (what a later load compares)."""
    out = {}
    for path in dense.files:
        st = os.stat(path)
        out[os.path.basename(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _packing(layer_packed: dict[int, tuple[PackedSpec, ...]]) -> dict[str, list]:
    return {
        str(layer): [
            {
                "name": s.name,
                "kind": s.kind,
                "dense_shape": list(s.dense_shape),
                "dtype": str(s.dtype).removeprefix("torch."),
                "transposed": s.transposed,
                "group_size": s.group_size,
            }
            for s in specs
        ]
        for layer, specs in sorted(layer_packed.items())
    }


def _versions() -> dict[str, str]:
    return {"optimum-quanto": metadata.version("optimum-quanto"), "torch": torch.__version__.split("+")[0]}


def write_sidecar(
    out_folder: str,
    dense_store: ExpertStore,
    slot_layout: ExpertLayout,
    expert_dtype: str,
    num_experts: dict[int, int],
    progress=None,
    neurons: dict | None = None,
) -> str:
    """Quantize every expert of the checkpoint `dense_store` reads and write the sidecar to `out_folder`.

    One MoE layer's packed experts are in memory at a time; each file is written under a temporary name and
    renamed, and the manifest is written last, so an interrupted run leaves no sidecar that a load would accept.

    Args:
        out_folder: where to write (created; an existing sidecar there is replaced).
        dense_store: reads the checkpoint's experts at full precision.
        slot_layout: the packed slot layout (its packing per layer, and the kept neurons if any).
        expert_dtype: `"int8"` or `"int4"`.
        num_experts: experts per MoE layer.
        progress: called with the number of experts written after each one (e.g. a tqdm's `update`), or None.
        neurons: `{"expert_fraction", "file": {size, mtime_ns}}` when neurons are dropped (recorded, then checked).

    Returns:
        The manifest's path.
    """
    from safetensors.torch import save_file

    os.makedirs(out_folder, exist_ok=True)
    manifest_path = os.path.join(out_folder, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # a half-replaced sidecar must not look valid
    staging = torch.empty(dense_store.layout.slot_nbytes, dtype=torch.uint8)
    for layer in sorted(slot_layout.layer_packed):
        tensors = {}
        for e in range(num_experts[layer]):
            dense_store.read_into(layer, e, staging)
            parts = encode_expert(slot_layout, layer, e, slot_views(staging, dense_store.layout, layer))
            for name, t in parts.items():
                tensors[f"{e}.{name}"] = t.contiguous()
            if progress is not None:
                progress(1)
        path = os.path.join(out_folder, _layer_file(layer))
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
    manifest = {
        "format": _FORMAT,
        "version": _VERSION,
        "expert_dtype": expert_dtype,
        "packing": _packing(slot_layout.layer_packed),
        "neurons": neurons,
        "num_experts": {str(k): v for k, v in sorted(num_experts.items())},
        "source_files": _sources(dense_store.layout),
        "quantizer": _versions(),
    }
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest_path


def _refuse(folder: str, what: str, fix: str) -> SidecarError:
    return SidecarError(f"quantized expert sidecar {folder}: {what}; {fix}")


def open_sidecar(
    folder: str,
    dense: ExpertLayout,
    layer_packed: dict[int, tuple[PackedSpec, ...]],
    expert_dtype: str,
    rebuild: str,
    neurons: dict | None = None,
) -> dict[tuple[int, int], tuple[tuple[Piece, ...], ...]]:
    """Check the sidecar at `folder` against this load and locate every packed part in its files.

    Args:
        folder: the sidecar folder.
        dense: the checkpoint's expert layout (its files are the sidecar's source).
        layer_packed: the packing this load plans.
        expert_dtype: the precision asked for.
        rebuild: the command that rebuilds the sidecar (named in errors).
        neurons: the kept-neurons record this load expects (None at `expert_fraction=1`).

    Returns:
        `(layer, expert) -> pieces of each packed part`, in `packed_layout`'s order.

    Raises:
        SidecarError: no manifest, another format or precision, stale (the checkpoint changed since), foreign (another
            model's packing), made by a torch with another int4 packing, or its files do not hold what it says.
    """
    manifest_path = os.path.join(folder, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise _refuse(folder, f"has no {MANIFEST} (not a sidecar, or an interrupted prepare)", rebuild) from None
    except (OSError, ValueError) as e:
        raise _refuse(folder, f"{MANIFEST} cannot be read ({e})", rebuild) from None
    if not isinstance(m, dict) or m.get("format") != _FORMAT or m.get("version") != _VERSION:
        raise _refuse(folder, f"{MANIFEST} is not a version-{_VERSION} hf_moe_offload sidecar manifest", rebuild)
    if m.get("expert_dtype") != expert_dtype:
        raise _refuse(
            folder,
            f"holds {m.get('expert_dtype')!r} experts but expert_dtype={expert_dtype!r} was asked",
            f"pass the sidecar of that precision, or {rebuild}",
        )
    now = _sources(dense)
    if m.get("source_files") != now:
        was = m.get("source_files") or {}
        changed = sorted(n for n in set(now) | set(was) if now.get(n) != was.get(n))
        raise _refuse(
            folder,
            f"is stale or belongs to another checkpoint: the checkpoint files {changed} differ (size or mtime) from "
            f"those it was made from",
            rebuild,
        )
    if m.get("neurons") != neurons:
        raise _refuse(
            folder,
            f"keeps neurons {m.get('neurons')} but this load asks for {neurons} (expert_fraction, or a recalibrated "
            f"neuron order)",
            rebuild,
        )
    if m.get("packing") != _packing(layer_packed):
        raise _refuse(folder, "was made with another packing (another model or hf_moe_offload version)", rebuild)
    torch_now = _versions()["torch"]
    if expert_dtype == "int4" and m.get("quantizer", {}).get("torch") != torch_now:
        raise _refuse(
            folder,
            f"was packed by torch {m.get('quantizer', {}).get('torch')} and int4 packing is torch's own (this is "
            f"torch {torch_now})",
            rebuild,
        )
    counts: dict[int, int] = {}
    for layer, _ in dense.pieces:
        counts[layer] = counts.get(layer, 0) + 1
    if m.get("num_experts") != {str(k): v for k, v in sorted(counts.items()) if k in layer_packed}:
        raise _refuse(folder, "holds another number of experts per layer than this model", rebuild)
    pieces: dict[tuple[int, int], tuple[tuple[Piece, ...], ...]] = {}
    num_experts = m["num_experts"]
    for layer, specs in layer_packed.items():
        path = os.path.join(folder, _layer_file(layer))
        if not os.path.isfile(path):
            raise _refuse(folder, f"lacks {_layer_file(layer)}", rebuild)
        tensors = read_header(path).tensors
        for e in range(int(num_experts.get(str(layer), 0))):
            per_part = []
            for spec in specs:
                for name, shape, dtype in spec.parts():
                    info = tensors.get(f"{e}.{name}")
                    if info is None or tuple(info.shape) != tuple(shape) or info.dtype != dtype:
                        raise _refuse(
                            folder,
                            f"{_layer_file(layer)} lacks {e}.{name} as {list(shape)} {dtype} (found "
                            f"{None if info is None else (list(info.shape), info.dtype)})",
                            rebuild,
                        )
                    numel = info.nbytes // dtype.itemsize
                    per_part.append((Piece(path, info.start, info.nbytes, dtype, 0, numel),))
            pieces[(layer, e)] = tuple(per_part)
    return pieces

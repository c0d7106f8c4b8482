"""`OffloadConfig`: what a user asks of the offloader, validated on construction.

Budgets are bytes of *expert weights* per memory tier. They accept human units (`"6GiB"`, `"512MB"`, `1 << 30`)
or a share of the model's total expert bytes (`"25%"`, `0.25`), which is resolved once the model's layout is
known. `offload_config=` in `from_pretrained` takes an `OffloadConfig`, a dict, a JSON string or the path of a
JSON file (for clients that can only pass strings, such as eval harnesses); `OffloadConfig.coerce` does that.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import OffloadConfigError

__all__ = ["OffloadConfig", "Budget", "parse_budget", "format_bytes", "config_table"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")
_IO_MODES = ("auto", "fadvise", "direct", "cached")
_EXPERT_DTYPES = ("auto", "int8", "int4")  # precision.EXPERT_DTYPES (config stays below every other module)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Budget:
    """A memory budget: either an absolute number of bytes or a fraction of the model's expert bytes."""

    nbytes: int | None = None
    fraction: float | None = None

    def resolve(self, total_expert_bytes: int) -> int:
        """Bytes this budget allows for a model whose experts weigh `total_expert_bytes` in all."""
        if self.nbytes is not None:
            return self.nbytes
        return int(self.fraction * total_expert_bytes)

    def __str__(self) -> str:
        return format_bytes(self.nbytes) if self.nbytes is not None else f"{self.fraction * 100:g}% of expert bytes"


def format_bytes(n: int | float, round_up: bool = False) -> str:
    """Human form of a byte count, e.g. `1.50 GiB`; `round_up` rounds the last digit up (for a minimum, so that
    the printed value is itself enough)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if round_up else n:.0f} {unit}"
            return f"{math.ceil(n * 100) / 100 if round_up else n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_budget(value: Any, field_name: str = "budget") -> Budget:
    """Parse a budget given as bytes (`int`), a fraction (`float` in (0, 1]), `"6GiB"`, `"512MB"` or `"25%"`.

    Args:
        value: the user's value.
        field_name: the config field, named in the error message.

    Raises:
        OffloadConfigError: when the value is negative, not a number with a known unit, or a fraction outside (0, 1].
    """
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool) or value is None:
        raise OffloadConfigError(
            f"{field_name}: expected bytes (e.g. 6GiB, 1073741824) or a share (25%), got {value!r}"
        )
    if isinstance(value, int):
        if value < 0:
            raise OffloadConfigError(f"{field_name}: expected a non-negative number of bytes, got {value}")
        return Budget(nbytes=value)
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise OffloadConfigError(
                f"{field_name}: a float is a share of the expert bytes and must lie in [0, 1], got {value}; "
                f"write bytes as an int or a string such as '6GiB'"
            )
        return Budget(fraction=value)
    if isinstance(value, str):
        m = _BUDGET_RE.match(value)
        if m:
            number, unit = float(m.group(1)), m.group(2).lower()
            if unit == "%":
                if number > 100:
                    raise OffloadConfigError(f"{field_name}: a share must be at most 100%, got {value!r}")
                return Budget(fraction=number / 100.0)
            if unit in _UNITS:
                return Budget(nbytes=int(number * _UNITS[unit]))
        raise OffloadConfigError(
            f"{field_name}: cannot read {value!r} as a budget; expected a number with a unit "
            f"(B, KB, MB, GB, KiB, MiB, GiB, TiB) such as '6GiB', or a share such as '25%'"
        )
    raise OffloadConfigError(f"{field_name}: expected int, float or str, got {type(value).__name__} ({value!r})")


@dataclass
class OffloadConfig:
    """How to offload a model's MoE experts.

    Example:
        ```python
        import hf_moe_offload
        from transformers import AutoModelForCausalLM

        cfg = hf_moe_offload.OffloadConfig(host_budget="2GiB")
        model = AutoModelForCausalLM.from_pretrained(path, offload_config=cfg)
        ```
    """

    host_budget: Any = field(
        default="50%",
        metadata={"help": "Bytes of experts kept in host RAM: '2GiB', 2147483648, or a share of expert bytes '25%'."},
    )
    device_budget: Any = field(
        default="25%",
        metadata={"help": "Bytes of experts kept on the accelerator (used only when device is CUDA); same units."},
    )
    policy: str = field(default="lru", metadata={"help": "Eviction policy name (see hf_moe_offload.list_policies())."})
    io_threads: int = field(default=2, metadata={"help": "Background threads reading experts from disk (1-64)."})
    device: str = field(
        default="auto", metadata={"help": "Where experts are computed: 'auto' (CUDA if present), 'cpu', 'cuda[:N]'."}
    )
    io_mode: str = field(
        default="auto",
        metadata={
            "help": "How expert bytes are read: 'auto' (chosen at load: 'cached' when the experts fit twice in the "
            "memory left, else 'direct' where the file system allows it, else 'fadvise'), 'fadvise' (pread then "
            "drop the pages from the page cache), 'direct' (O_DIRECT, bypasses the page cache), 'cached' (leave "
            "the page cache alone)."
        },
    )
    threads: Any = field(
        default="auto",
        metadata={
            "help": "torch intra-op threads: 'auto' (at load and each generate: the usable cores less those other "
            "processes keep busy; left alone when OMP_NUM_THREADS is set or torch.set_num_threads was called) or "
            "a fixed count (1-1024)."
        },
    )

    prefetch: str = field(
        default="gate_lookahead",
        metadata={
            "help": "Predictors that prefetch experts before they are needed, comma-separated (gate_lookahead, "
            "correlation, history) or 'none'."
        },
    )
    prefetch_depth: int = field(default=1, metadata={"help": "How many MoE layers ahead to prefetch (1-8)."})
    mode: str = field(
        default="manual",
        metadata={
            "help": "'manual' (use the budgets given) or 'auto' (measure this machine once, then let the planner "
            "choose the budgets and prefetch depth from free memory and a roofline cost model)."
        },
    )

    expert_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision of experts in the cache: 'auto' (as the model computes, bit-identical to the normal "
            "model), 'int8' or 'int4' (quantized with optimum-quanto: a budget holds 2-4x more experts; CPU only)."
        },
    )
    sidecar: str | None = field(
        default=None,
        metadata={
            "help": "Folder of quantized experts written by `hf-moe-offload prepare` (read instead of the checkpoint "
            "on a miss); default: the model's own `hf_moe_offload_experts/<expert_dtype>` if present; 'none': "
            "quantize on each load."
        },
    )

    expert_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share (0-1] of each expert's intermediate neurons to load and compute, the most important "
            "first (needs `hf-moe-offload calibrate`); 1: every neuron, bit-identical."
        },
    )
    mixed_precision: float | None = field(
        default=None,
        metadata={
            "help": "Routing weight (0-1] at or above which a missing expert is loaded at full precision; experts "
            "below it compute from their quantized copy (needs expert_dtype 'int8'/'int4'; half the host budget, and "
            "at least the top-k experts of a layer, goes to full-precision slots). None: off."
        },
    )

    def __post_init__(self) -> None:
        self.host_budget = parse_budget(self.host_budget, "host_budget")
        self.device_budget = parse_budget(self.device_budget, "device_budget")
        if not isinstance(self.policy, str) or not self.policy:
            raise OffloadConfigError(f"policy: expected a policy name such as 'lru', got {self.policy!r}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or not 1 <= self.io_threads <= 64:
            raise OffloadConfigError(f"io_threads: expected an int in [1, 64], got {self.io_threads!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise OffloadConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.prefetch, str) or not self.prefetch.strip():
            raise OffloadConfigError(
                f"prefetch: expected predictor names such as 'gate_lookahead' or 'none', got {self.prefetch!r}"
            )
        if (
            isinstance(self.prefetch_depth, bool)
            or not isinstance(self.prefetch_depth, int)
            or not 1 <= self.prefetch_depth <= 8
        ):
            raise OffloadConfigError(f"prefetch_depth: expected an int in [1, 8], got {self.prefetch_depth!r}")
        if self.mode not in ("manual", "auto"):
            raise OffloadConfigError(f"mode: expected 'manual' or 'auto', got {self.mode!r}")
        t = self.threads = (
            int(self.threads) if isinstance(self.threads, str) and self.threads.isdigit() else self.threads
        )
        if t != "auto" and (isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 1024):
            raise OffloadConfigError(f"threads: expected 'auto' or an int in [1, 1024], got {t!r}")
        if self.io_mode not in _IO_MODES:
            raise OffloadConfigError(f"io_mode: expected one of {', '.join(_IO_MODES)}, got {self.io_mode!r}")
        if self.expert_dtype not in _EXPERT_DTYPES:
            raise OffloadConfigError(
                f"expert_dtype: expected one of {', '.join(_EXPERT_DTYPES)}, got {self.expert_dtype!r}"
            )
        if self.sidecar is not None and (not isinstance(self.sidecar, (str, os.PathLike)) or not str(self.sidecar)):
            raise OffloadConfigError(
                f"sidecar: expected the path of a folder written by `hf-moe-offload prepare`, 'none' or None, got "
                f"{self.sidecar!r}"
            )
        f = self.expert_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise OffloadConfigError(f"expert_fraction: expected a share in (0, 1], got {f!r}")
        self.expert_fraction = float(f)
        if self.mixed_precision is not None:
            m = self.mixed_precision
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
                raise OffloadConfigError(f"mixed_precision: expected a routing weight in (0, 1] or None, got {m!r}")
            if self.expert_dtype == "auto":
                raise OffloadConfigError(
                    f"mixed_precision={m!r} needs a quantized copy of the experts: set expert_dtype to 'int8' or "
                    f"'int4' (experts below the threshold compute from it), or drop mixed_precision"
                )
            self.mixed_precision = float(m)
        if self.sidecar is not None:
            self.sidecar = os.fspath(self.sidecar)
            if self.expert_dtype == "auto" and self.sidecar != "none":
                raise OffloadConfigError(
                    f"sidecar={self.sidecar!r} holds quantized experts, but expert_dtype is 'auto' (full precision); "
                    f"set expert_dtype to the sidecar's precision ('int8' or 'int4') or drop sidecar"
                )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OffloadConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise OffloadConfigError(
                f"unknown offload_config key(s) {unknown}; valid keys are {', '.join(cls.field_names())}"
            )
        return cls(**data)

    @classmethod
    def coerce(cls, value: Any) -> OffloadConfig:
        """Accept an `OffloadConfig`, a dict, a JSON string or a path to a JSON file."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            text = os.fspath(value)
            if text.lstrip().startswith("{"):
                source = "JSON string"
            elif os.path.isfile(text):
                source = f"JSON file {text}"
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            else:
                raise OffloadConfigError(
                    f"offload_config: {text!r} is neither a JSON object string nor an existing JSON file path"
                )
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise OffloadConfigError(f"offload_config: {source} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise OffloadConfigError(f"offload_config: {source} must hold a JSON object, got {type(data).__name__}")
            return cls.from_dict(data)
        raise OffloadConfigError(
            f"offload_config: expected OffloadConfig, dict, JSON string or JSON file path, got {type(value).__name__}"
        )

    @property
    def predictor_names(self) -> list[str]:
        names = [n.strip() for n in self.prefetch.split(",") if n.strip()]
        return [] if names == ["none"] else names

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `coerce` accepts back."""
        out = dataclasses.asdict(self)
        for name in ("host_budget", "device_budget"):
            b = getattr(self, name)
            out[name] = b.nbytes if b.nbytes is not None else f"{b.fraction * 100:g}%"
        return out


def config_table() -> str:
    """The Markdown table of every `OffloadConfig` field (name, default, meaning), as README.md shows it."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(OffloadConfig):
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)

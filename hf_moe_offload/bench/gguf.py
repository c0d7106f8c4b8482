"""GGUF files of a safetensors checkpoint, made with llama.cpp's own converter and quantizer, for the llama.cpp
baseline of `hf-moe-offload bench`.

```
checkpoint folder --identity (config, file names, sizes, mtimes)--> <folder>.gguf/<key>/  (cached, next to it)
    staging folder: symlinks to config.json + *.safetensors, a synthetic llama tokenizer of the model's vocab size
    --convert_hf_to_gguf.py --outtype bf16--> bf16.gguf --llama_model_quantize--> q8_0.gguf, q4_k_m.gguf
```

The converter is llama.cpp's `convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` folders, the very files
that the `llama-cpp-python` sdist vendors (`vendor/llama.cpp`); the wheel does not install them, so
`install_converter` copies them from the sdist (or a llama.cpp checkout) into a cache folder once. The quantizer is
`llama_cpp.llama_model_quantize` of the bindings, run in a child process.

The benchmark feeds token ids, never text, so the GGUF's vocabulary only has to load: every checkpoint is converted
with a synthetic Llama-style byte-fallback vocabulary of `vocab_size` tokens (`<unk> <s> </s>`, the byte tokens
that fit, then placeholders), which the converter's Llama path accepts whatever the checkpoint's own tokenizer is
(a trained char-level or byte-level BPE whose pre-tokenizer llama.cpp does not know, or none at all).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import LlamaCppUnavailableError, OffloadConfigError

__all__ = [
    "GGUF_TYPES",
    "checkpoint_identity",
    "ensure_ggufs",
    "find_converter",
    "gguf_folder",
    "install_converter",
    "stage_checkpoint",
]

# GGUF type -> llama.cpp `llama_ftype` (include/llama.h); bf16 comes from the converter, the others from bf16.
GGUF_TYPES: dict[str, int] = {"bf16": 32, "q8_0": 7, "q4_k_m": 15}
CONVERTER_ENV = "HF_MOE_OFFLOAD_LLAMA_CPP_DIR"
_CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
_INSTALL_HINT = (
    "install it with `python -m hf_moe_offload.bench.gguf --install-converter [SDIST_OR_LLAMA_CPP_DIR]` (without a "
    "source it downloads the llama-cpp-python sdist with pip), or point ${env} at a llama.cpp checkout"
).replace("{env}", CONVERTER_ENV)


def _llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - not installed
        return None


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_moe_offload" / "llama.cpp"


def find_converter(path: str | Path | None = None) -> Path:
    """The llama.cpp folder holding `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`.

    Looks at `path`, then `$HF_MOE_OFFLOAD_LLAMA_CPP_DIR`, then the cache for the installed llama-cpp-python
    version (`~/.cache/hf_moe_offload/llama.cpp/<version>`, filled by `install_converter`).

    Raises:
        LlamaCppUnavailableError: none of them holds the converter.
    """
    version = _llama_cpp_version()
    candidates = [path, os.environ.get(CONVERTER_ENV), _cache_root() / version if version else None]
    for candidate in filter(None, candidates):
        folder = Path(candidate)
        if (folder / "vendor" / "llama.cpp").is_dir():
            folder = folder / "vendor" / "llama.cpp"
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py").is_dir():
            return folder
    looked = ", ".join(str(c) for c in filter(None, candidates)) or "nowhere (llama-cpp-python is not installed)"
    raise LlamaCppUnavailableError(f"llama.cpp's GGUF converter was not found (looked in {looked}); {_INSTALL_HINT}")


def install_converter(source: str | Path | None = None, *, version: str | None = None) -> Path:
    """Copy llama.cpp's converter into the cache folder that `find_converter` reads, and return that folder.

    Args:
        source: a llama-cpp-python sdist (`.tar.gz`), its unpacked folder or a llama.cpp checkout; None downloads
            the sdist of the installed llama-cpp-python version with `pip download` (network).
        version: the cache key; default the installed llama-cpp-python version.

    Raises:
        LlamaCppUnavailableError: no version to key the cache by, or the source has no converter.
    """
    version = version or _llama_cpp_version()
    if version is None:
        raise LlamaCppUnavailableError(
            "llama-cpp-python is not installed: install the extra first (`pip install 'hf-moe-offload[llamacpp]'`)"
        )
    target = _cache_root() / version
    with tempfile.TemporaryDirectory(prefix="hf-moe-offload-llama.cpp-") as tmp:
        if source is None:
            cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps"]
            subprocess.run([*cmd, "--no-binary", ":all:", "-d", tmp], check=True)
            source = next(Path(tmp).glob("*.tar.gz"))
        source = Path(source)
        if source.is_file():
            with tarfile.open(source) as tar:
                members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and _wanted(m.name)]
                tar.extractall(tmp, members=members, filter="data")
            source = next(Path(tmp).glob("*/vendor/llama.cpp"), Path(tmp))
        folder = find_converter(source)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in _CONVERTER_FILES:
            src = folder / name
            if src.is_dir():
                shutil.copytree(src, staging / name, ignore=shutil.ignore_patterns("__pycache__", "tests"))
            elif src.is_file():
                shutil.copy2(src, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _wanted(name: str) -> bool:
    tail = name.split("/vendor/llama.cpp/", 1)[1]
    return any(tail == n or tail.startswith(n + "/") for n in _CONVERTER_FILES)


def checkpoint_identity(model_dir: str | Path) -> str:
    """A 16-hex-digit key of a checkpoint folder: its `config.json`, and the name, size and mtime of each weight
    file (a rewritten checkpoint gets a new key, so its GGUFs are made again)."""
    folder = Path(model_dir)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def gguf_folder(model_dir: str | Path) -> Path:
    """Where the GGUFs of a checkpoint are cached: `<folder>.gguf/<identity>/` next to the checkpoint folder."""
    folder = Path(model_dir).resolve()
    return folder.with_name(folder.name + ".gguf") / checkpoint_identity(folder)


def _synthetic_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models

    if vocab_size < 16:
        raise OffloadConfigError(
            f"GGUF conversion: vocab_size must be >= 16 for the synthetic vocabulary, got {vocab_size}"
        )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(min(256, vocab_size - 3))}
    vocab |= {f"\u2581t{i}": i for i in range(len(vocab), vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def stage_checkpoint(model_dir: str | Path, staging: str | Path) -> Path:
    """A folder the converter accepts: symlinks to the checkpoint's weights, its config (with `architectures`) and a
    synthetic tokenizer."""
    src, staging = Path(model_dir).resolve(), Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            (staging / path.name).symlink_to(path)
    config = json.loads((src / "config.json").read_text())
    if not config.get("architectures"):  # the converter picks its model class by it; synthesized configs lack it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"), "unknown")]
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    _synthetic_tokenizer(staging, int(config.get("vocab_size") or config["text_config"]["vocab_size"]))
    return staging


def _convert(model_dir: Path, out: Path, converter: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="hf-moe-offload-gguf-") as tmp:
        staging = stage_checkpoint(model_dir, Path(tmp) / "model")
        cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(staging)]
        cmd += ["--outfile", str(out), "--outtype", "bf16"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=converter)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise OffloadConfigError(
            f"llama.cpp's converter could not convert {model_dir} (an architecture it does not know, or a layout "
            f"other than the hub's per-expert tensors?):\n{tail}"
        )


_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def _quantize(src: Path, out: Path, ftype: int, threads: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _QUANTIZE, str(src), str(out), str(ftype), str(threads)], capture_output=True, text=True
    )
    if proc.returncode != 0 or not out.is_file():
        if "No module named 'llama_cpp'" in proc.stderr:
            raise LlamaCppUnavailableError(
                "quantizing to GGUF needs llama-cpp-python: `pip install 'hf-moe-offload[llamacpp]'`"
            )
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise OffloadConfigError(f"llama_model_quantize({src.name} -> {out.name}) failed ({proc.returncode}):\n{tail}")


def ensure_ggufs(
    model_dir: str | Path,
    types: tuple[str, ...] | list[str] = tuple(GGUF_TYPES),
    *,
    converter: str | Path | None = None,
    threads: int = 0,
    log=print,
) -> dict[str, Path]:
    """The GGUF files of a checkpoint, made once and cached next to it (`gguf_folder`).

    Args:
        model_dir: a safetensors checkpoint folder whose architecture llama.cpp's converter knows (Mixtral, ...).
        types: any of `GGUF_TYPES` ("bf16", "q8_0", "q4_k_m").
        converter: a llama.cpp folder (default: `find_converter()`).
        threads: quantizer threads (0: llama.cpp's default).
        log: where progress lines go (None: nowhere).

    Returns:
        `{type: path}`.

    Raises:
        OffloadConfigError: an unknown type, or the converter or quantizer failed.
        LlamaCppUnavailableError: the converter or llama-cpp-python is missing.

    Example:
        ```python
        >>> ensure_ggufs("models/moe-tiny", ["bf16", "q8_0"])
        {'bf16': PosixPath('models/moe-tiny.gguf/3f0c.../bf16.gguf'), 'q8_0': ...}
        ```
    """
    unknown = sorted(set(types) - set(GGUF_TYPES))
    if unknown:
        raise OffloadConfigError(f"GGUF types: unknown {unknown}; use {', '.join(GGUF_TYPES)}")
    model_dir = Path(model_dir).resolve()
    folder = gguf_folder(model_dir)
    for stale in folder.parent.glob("*"):  # one cache per checkpoint: a rewritten checkpoint replaces the old files
        if stale.is_dir() and stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {t: folder / f"{t}.gguf" for t in GGUF_TYPES}
    missing = [t for t in types if not paths[t].is_file()]
    if missing and not paths["bf16"].is_file():
        if log:
            log(f"gguf: converting {model_dir} to bf16 with llama.cpp's convert_hf_to_gguf.py")
        partial = folder / "bf16.gguf.partial"
        _convert(model_dir, partial, find_converter(converter))
        partial.replace(paths["bf16"])
    for t in missing:
        if t != "bf16":
            if log:
                log(f"gguf: quantizing to {t} with llama_model_quantize")
            partial = folder / f"{t}.gguf.partial"
            _quantize(paths["bf16"], partial, GGUF_TYPES[t], threads)
            partial.replace(paths[t])
    (folder / "source.json").write_text(json.dumps({"checkpoint": str(model_dir), "llama_cpp": _llama_cpp_version()}))
    return {t: paths[t] for t in types}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint folder to convert")
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help="comma-separated GGUF types")
    parser.add_argument("--install-converter", nargs="?", const="", metavar="SOURCE", help="sdist or llama.cpp dir")
    args = parser.parse_args(argv)
    if args.install_converter is not None:
        print(install_converter(args.install_converter or None))
    if args.model:
        for t, path in ensure_ggufs(args.model, [t.strip() for t in args.types.split(",") if t.strip()]).items():
            print(f"{t}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

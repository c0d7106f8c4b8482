"""The llama.cpp baseline of `hf-moe-offload bench`: GGUF conversion pieces, teacher forcing, the configurations, and
(when `llama-cpp-python` is installed) a real run of llama.cpp on `models/moe-tiny` against transformers."""

import importlib.util
import json
import mmap
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from hf_moe_offload.bench import gguf
from hf_moe_offload.bench.llamacpp import release_mapped_file
from hf_moe_offload.bench.scenario_bench import forced_ids, make_configs, make_points, run_scenarios
from hf_moe_offload.bench.scenario_report import summarise
from hf_moe_offload.bench.scenario_worker import ForcedTokens
from hf_moe_offload.bench.synth import synthesize_from_config
from hf_moe_offload.bench.sysmem import page_cache_resident_bytes
from hf_moe_offload.errors import LlamaCppUnavailableError, OffloadConfigError
from hf_moe_offload.scheduling.profile import HardwareProfile, LinearFit, evict_page_cache
from hf_moe_offload.testing import tiny_mixtral_config

MOE_TINY = Path(__file__).resolve().parents[2] / "models" / "moe-tiny"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return synthesize_from_config(tmp_path_factory.mktemp("synth") / "mixtral", tiny_mixtral_config(), progress=False)


def test_llamacpp_baselines_make_one_config_per_gguf_type_and_budget():
    names = [c.name for c in make_configs(["25", "2GiB"], baselines=["memory", "llamacpp"])]
    assert names[0] == "memory"
    assert {"llamacpp-bf16@25%", "llamacpp-q8_0@25%", "llamacpp-q4_k_m@25%", "llamacpp-q4_k_m@2GiB"} <= set(names)
    only = [c for c in make_configs(["25"], baselines=["llamacpp-q8_0"]) if c.kind == "llamacpp"]
    assert [(c.name, c.extra["gguf_type"]) for c in only] == [("llamacpp-q8_0@25%", "q8_0")]
    with pytest.raises(OffloadConfigError, match="llamacpp-q3"):
        make_configs(["25"], baselines=["llamacpp-q3"])


def test_gguf_cache_is_next_to_the_checkpoint_and_keyed_by_its_files(tiny_dir):
    key = gguf.checkpoint_identity(tiny_dir)
    assert gguf.gguf_folder(tiny_dir) == tiny_dir.with_name(tiny_dir.name + ".gguf") / key
    assert gguf.checkpoint_identity(tiny_dir) == key
    weights = tiny_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a rewritten file
    assert gguf.checkpoint_identity(tiny_dir) != key


def test_staged_checkpoint_has_a_synthetic_vocabulary_of_the_model_size(tiny_dir, tmp_path):
    staging = gguf.stage_checkpoint(tiny_dir, tmp_path / "staged")
    assert (staging / "model.safetensors").resolve() == (tiny_dir / "model.safetensors").resolve()
    assert json.loads((staging / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    spec = json.loads((staging / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"]  # what llama.cpp's Llama path reads
    assert spec["decoder"]["type"] == "Sequence"
    tok = AutoTokenizer.from_pretrained(staging)
    assert len(tok) == json.loads((tiny_dir / "config.json").read_text())["vocab_size"] == 256
    assert tok.convert_ids_to_tokens([0, 2, 3, 255]) == ["<unk>", "</s>", "<0x00>", "<0xFC>"]


def test_unknown_gguf_type_and_missing_converter_raise_typed_errors(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(OffloadConfigError, match="q3_k"):
        gguf.ensure_ggufs(tiny_dir, ["q3_k"])
    monkeypatch.setenv(gguf.CONVERTER_ENV, str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(LlamaCppUnavailableError, match="install-converter") as err:
        gguf.find_converter()
    assert isinstance(err.value, ImportError)


def test_forced_tokens_feed_the_given_ids_and_keep_the_models_top1(tiny_dir):
    model = MixtralForCausalLM.from_pretrained(tiny_dir).eval()
    gen = torch.Generator().manual_seed(0)
    prompt, forced = torch.randint(0, 256, (2, 6), generator=gen), torch.randint(0, 256, (2, 4), generator=gen)
    forcing = ForcedTokens(forced)
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, logits_processor=[forcing], pad_token_id=0)
        assert torch.equal(out[:, 6:], forced)
        full = torch.cat([prompt, forced], dim=1)
        expected = model(full).logits[:, 5:9].argmax(-1)  # the top-1 after the prompt and each fed id
    assert torch.tensor(forcing.predictions).T.tolist() == expected.tolist()


def test_forced_ids_are_drawn_once_per_point(tiny_dir):
    points = make_points(["latency", "throughput"], [2], prompt_len=5, new_tokens=3)
    ids = forced_ids(tiny_dir, points, seed=1)
    assert [len(ids["latency"]), len(ids["latency"][0])] == [1, 8]
    assert [len(ids["throughput@2"]), len(ids["throughput@2"][0])] == [2, 8]
    assert ids == forced_ids(tiny_dir, points, seed=1)


def test_release_mapped_file_lets_the_page_cache_drop_a_live_mapping(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(8 * 1024**2))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        sum(mapped[i] for i in range(0, len(mapped), 4096))  # fault every page in
        assert release_mapped_file(path) >= 8 * 1024**2
        evict_page_cache(path)
        assert page_cache_resident_bytes(path) <= 1024**2
        assert mapped[123] == path.read_bytes()[123]  # the mapping still reads the file


@pytest.fixture(scope="module")
def moe_tiny(tmp_path_factory):
    """A folder of symlinks to models/moe-tiny, so that its GGUFs are cached in a temporary folder."""
    folder = tmp_path_factory.mktemp("llamacpp") / "moe-tiny"
    folder.mkdir()
    for path in MOE_TINY.iterdir():
        (folder / path.name).symlink_to(path)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'hf-moe-offload[llamacpp]')"
)
def test_llamacpp_bf16_agrees_with_transformers_on_moe_tiny(moe_tiny):
    try:
        gguf.find_converter()
    except LlamaCppUnavailableError:
        gguf.install_converter()  # once per llama-cpp-python version: pip download of its sdist
    paths = gguf.ensure_ggufs(moe_tiny, ["bf16", "q8_0"], log=None)
    assert paths["bf16"].parent == gguf.gguf_folder(moe_tiny)
    assert paths["q8_0"].stat().st_size < 0.7 * paths["bf16"].stat().st_size
    configs = make_configs(["25"], baselines=["memory", "llamacpp-bf16", "llamacpp-q8_0"])
    configs = [c for c in configs if c.kind != "offload"]
    points = make_points(["latency"], [], prompt_len=16, new_tokens=12)
    sizes = {"total": 1, "expert": 1, "non_expert": 0}
    runs = run_scenarios(moe_tiny, configs, points, sizes, reps=1, mode="cold", in_process=True, progress=False)
    limits = HardwareProfile(1, 1, 1, "bfloat16", disk_read_Bps=1e9, cpu_mem_Bps=1e10, cpu_fit=LinearFit(0, 0))
    table = summarise(runs, configs, points, limits, "cold")["latency"]
    bf16, q8 = table["llamacpp-bf16@25%"], table["llamacpp-q8_0@25%"]
    assert bf16["runs_ok"] == 1 and bf16["problems"] == []
    assert bf16["top1_vs_memory"] >= 0.9, bf16
    assert q8["top1_vs_memory"] >= 0.7, q8
    assert len(runs["llamacpp-bf16@25%"][0]["points"]["latency"]["decode_steps_s"]) == 11
    shutil.rmtree(paths["bf16"].parent.parent)

import json

import pytest

from hf_moe_offload import OffloadConfig, OffloadConfigError
from hf_moe_offload.config import parse_budget


@pytest.mark.parametrize(
    "value,nbytes,fraction",
    [
        ("6GiB", 6 * 2**30, None),
        ("512MB", 512 * 10**6, None),
        ("1.5 GiB", int(1.5 * 2**30), None),
        (1 << 20, 1 << 20, None),
        ("25%", None, 0.25),
        (0.5, None, 0.5),
        ("100%", None, 1.0),
    ],
)
def test_budget_units(value, nbytes, fraction):
    b = parse_budget(value)
    assert (b.nbytes, b.fraction) == (nbytes, fraction)


def test_budget_resolves_fraction_against_expert_bytes():
    assert parse_budget("25%").resolve(1000) == 250
    assert parse_budget("1KiB").resolve(10**9) == 1024


@pytest.mark.parametrize("value", ["six gigs", "-1GiB", -5, 1.5, "150%", None, True, [1]])
def test_bad_budget_raises_typed_error_naming_field(value):
    with pytest.raises(OffloadConfigError, match="host_budget"):
        OffloadConfig(host_budget=value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"io_threads": 0}, "io_threads"),
        ({"io_threads": "2"}, "io_threads"),
        ({"device": "tpu"}, "device"),
        ({"io_mode": "mmap"}, "io_mode"),
        ({"policy": ""}, "policy"),
    ],
)
def test_invalid_fields(kwargs, field):
    with pytest.raises(OffloadConfigError, match=field):
        OffloadConfig(**kwargs)


def test_config_error_is_also_value_error():
    with pytest.raises(ValueError):
        OffloadConfig(io_threads=-1)


def test_coerce_dict_json_string_and_file(tmp_path):
    want = OffloadConfig(host_budget="2GiB", policy="lfu")
    assert OffloadConfig.coerce({"host_budget": "2GiB", "policy": "lfu"}) == want
    assert OffloadConfig.coerce('{"host_budget": "2GiB", "policy": "lfu"}') == want
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(want.to_dict()))
    assert OffloadConfig.coerce(str(path)) == want
    assert OffloadConfig.coerce(want) is want


def test_coerce_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(OffloadConfigError, match="valid keys are .*host_budget"):
        OffloadConfig.coerce({"host_bugdet": "1GiB"})


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", "/no/such/file.json", 42])
def test_coerce_rejects_bad_values(value):
    with pytest.raises(OffloadConfigError):
        OffloadConfig.coerce(value)


def test_to_dict_round_trips():
    cfg = OffloadConfig(host_budget="25%", device_budget=123456, io_mode="direct")
    assert OffloadConfig.coerce(cfg.to_dict()) == cfg


def test_readme_lists_every_config_field_as_generated():
    import pathlib

    from hf_moe_offload.config import config_table

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("-->\n", 1)[1].split("\n<!-- /config-table -->")[0] if "config-table" in readme else ""
    assert block == config_table(), "README's OffloadConfig table is stale: paste hf_moe_offload.config.config_table()"

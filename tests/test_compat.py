"""The tested transformers range: importing with an untested release warns once, in one line naming the range."""

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from hf_moe_offload._compat import (
    TESTED_TRANSFORMERS,
    UntestedVersionWarning,
    check_transformers_version,
    supported_range,
)


def test_installed_transformers_is_in_the_supported_range():
    """CI and scripts/test_matrix.sh run on tested releases only: a release outside the range fails here."""
    assert check_transformers_version(version("transformers")), (version("transformers"), TESTED_TRANSFORMERS)


@pytest.mark.parametrize("v", ["5.23.0", "5.23.4", "5.24.0", "5.24.1.dev0"])
def test_tested_releases_do_not_warn(v, recwarn):
    assert check_transformers_version(v) and not recwarn.list


@pytest.mark.parametrize("v", ["5.22.2", "5.25.0", "6.0.0", "5.25.0.dev0"])
def test_untested_releases_warn_naming_the_range(v):
    with pytest.warns(UntestedVersionWarning) as w:
        assert not check_transformers_version(v)
    msg = str(w[0].message)
    assert len(w) == 1 and "\n" not in msg
    assert f"transformers {v} is installed" in msg and f"transformers{supported_range()}" in msg
    assert supported_range() == ">=5.23,<5.25"


def test_import_warns_once_on_an_untested_install(tmp_path):
    """A real import, with a transformers 9.0.0 distribution's metadata first on the path: one warning line on stderr."""
    dist = tmp_path / "transformers-9.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 9.0.0\n")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import hf_moe_offload"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    lines = [line for line in out.stderr.splitlines() if "UntestedVersionWarning" in line]
    assert len(lines) == 1, out.stderr
    assert "transformers 9.0.0 is installed" in lines[0] and supported_range() in lines[0]
    clean = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", "import hf_moe_offload"], capture_output=True, text=True
    )
    assert clean.returncode == 0 and "UntestedVersionWarning" not in clean.stderr, clean.stderr


def test_the_matrix_script_runs_every_tested_release():
    """scripts/test_matrix.sh pins one release per tested minor; CI runs the oldest there (its own venv is newest)."""
    root = Path(__file__).resolve().parents[1]
    script = (root / "scripts" / "test_matrix.sh").read_text()
    pins = re.search(r'^DEFAULT_VERSIONS="([^"]+)"', script, flags=re.M).group(1).split()
    assert sorted(".".join(p.split(".")[:2]) for p in pins) == sorted(TESTED_TRANSFORMERS)
    assert f"scripts/test_matrix.sh {pins[0]}" in (root / ".ci" / "run").read_text()

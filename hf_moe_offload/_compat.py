"""Which transformers releases hf_moe_offload is tested against, and the one-line warning for any other.

The dependency in pyproject.toml has lower bounds only (installing never downgrades the user's stack); the tested
range is the set of minor releases `scripts/test_matrix.sh` runs the suite on. Importing the package with a
transformers outside it warns once, naming the range; it does not refuse, because a patch or minor release
usually keeps the experts interface this package hooks into.
"""

from __future__ import annotations

import warnings

__all__ = ["TESTED_TRANSFORMERS", "UntestedVersionWarning", "supported_range", "check_transformers_version"]

# Minor releases the whole suite passes on (scripts/test_matrix.sh); any patch release of them counts as tested.
TESTED_TRANSFORMERS: tuple[str, ...] = ("5.23", "5.24")


class UntestedVersionWarning(UserWarning):
    """The installed transformers is outside the range hf_moe_offload is tested on."""


def supported_range() -> str:
    """The tested range in pip's syntax, e.g. `>=5.23,<5.25`."""
    major, minor = TESTED_TRANSFORMERS[-1].split(".")
    return f">={TESTED_TRANSFORMERS[0]},<{major}.{int(minor) + 1}"


def _minor(version: str) -> str:
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def check_transformers_version(version: str | None = None) -> bool:
    """Warn once (`UntestedVersionWarning`) when transformers' version is not in `TESTED_TRANSFORMERS`.

    Args:
        version: the version to check; the installed transformers' by default.

    Returns:
        True when the version is tested.
    """
    if version is None:  # read from the installed metadata: importing transformers here would cost seconds
        from importlib.metadata import version as installed

        version = installed("transformers")
    if _minor(version) in TESTED_TRANSFORMERS:
        return True
    warnings.warn(
        f"hf_moe_offload is tested with transformers{supported_range()} but transformers {version} is installed; "
        f"it may work, and if it does not, install a tested release: pip install 'transformers{supported_range()}'",
        UntestedVersionWarning,
        stacklevel=3,
    )
    return False

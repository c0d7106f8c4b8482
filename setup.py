"""Build hooks: `hf_moe_offload_autoload.pth` at the root of the wheel (regular and editable), and the trained tiny
model `models/moe-tiny` (47 MiB) inside the regular wheel as `hf_moe_offload/_shipped/moe-tiny`.

Everything else about the package is declared in pyproject.toml. The .pth file is what lets
`from_pretrained(..., offload_config=...)` work in programs that never import hf_moe_offload (lm_eval, servers);
see `_hf_moe_offload_autoload.py` and docs/usage.md ("Without an import").
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).parent
PTH = ROOT / "hf_moe_offload_autoload.pth"
SHIPPED = ("moe-tiny",)  # = hf_moe_offload.shipped.SHIPPED_MODELS


class BuildPyWithPth(build_py):
    """Adds the .pth file at the wheel's root and the shipped model as package data (hf_moe_offload/shipped.py)."""

    def _extra(self) -> list[tuple[Path, Path]]:
        pairs = [(PTH, Path(self.build_lib) / PTH.name)]
        if not self.editable_mode:  # an editable install reads the checkout's models/ folder
            for name in SHIPPED:
                for src in sorted((ROOT / "models" / name).iterdir()):
                    pairs.append((src, Path(self.build_lib) / "hf_moe_offload" / "_shipped" / name / src.name))
        return pairs

    def run(self):
        super().run()
        for src, dest in self._extra():
            self.mkpath(str(dest.parent))
            self.copy_file(str(src), str(dest), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *(str(dest) for _, dest in self._extra())]


class EditableWheelWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(PTH, Path(unpacked_wheel) / PTH.name)  # packed with the wheel's files, listed in RECORD
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})

"""Build smsd: the Python package, the Triton kernels (as ``smsd.kernels``) and the
C++ CPU extension ``smsd._C``.

Build with ``pip install -e . --no-build-isolation`` (or ``pip wheel . --no-build-isolation``)
so the extension compiles against the torch that is already installed.
"""

from __future__ import annotations

import os
import re
import sys
from glob import glob
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
INIT = Path(ROOT, "smsd", "__init__.py").read_text()
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT, re.M)[1]  # one place for the version
TORCH_VERSION = str(torch.__version__)  # the torch this build compiles smsd._C against
TORCH_MINOR = ".".join(TORCH_VERSION.split("+")[0].split(".")[:2])

REQUIREMENTS = ["numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60", "cryptography>=50"]

# A build names the torch its extension is compiled against, 0.1.0+torch2.13 requiring
# torch==2.13.*, since torch keeps no C++ ABI across minor versions. An sdist is source,
# built later against whatever torch is installed then, so it keeps the plain version
# and a loose torch: a tight one resolved by pip on a machine without torch could pull
# a multi-GB CUDA build (the Makefile pins the torch to install), and a range keeps an
# installed torch from being replaced. Editable installs are tagged like wheels: pip
# prepares one metadata for both and rejects a wheel whose version differs from it.
if "sdist" in sys.argv[1:]:
    version, torch_requirement = VERSION, "torch>=2.4"
else:
    version, torch_requirement = f"{VERSION}+torch{TORCH_MINOR}", f"torch=={TORCH_MINOR}.*"

BUILD_INFO = '''"""Written by setup.py when it builds smsd._C (not in git)."""

TORCH_VERSION = "{torch}"  # the torch smsd._C was compiled against
'''


def _write_build_info(package_dir: str) -> None:
    """Record the build's torch in ``smsd/_build_info.py``, which ``smsd.backends()``
    reads without loading ``smsd._C`` (an extension built for another torch may not load)."""
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write(BUILD_INFO.format(torch=TORCH_VERSION))


class SmsdBuildExt(BuildExtension):
    """Builds ``smsd._C`` and writes the build info beside it (the source tree when
    building in place, as editable installs do; else the build folder)."""

    def run(self) -> None:
        super().run()
        _write_build_info(os.path.join(ROOT if self.inplace else self.build_lib, "smsd"))


def _extension() -> CppExtension:
    sources = sorted(os.path.relpath(p, ROOT) for p in glob(os.path.join(ROOT, "csrc", "*.cpp")))
    return CppExtension(
        name="smsd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # C++20: torch >= 2.14's headers require it, and torch's own JIT builds use it.
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++20"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    version=version,
    install_requires=[torch_requirement, *REQUIREMENTS],
    packages=[*find_packages(include=["smsd", "smsd.*"]), "smsd.kernels"],
    package_dir={"smsd.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": SmsdBuildExt.with_options(use_ninja=True)},
)

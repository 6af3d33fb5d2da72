"""Build smsd: the Python package, the Triton kernels (as ``smsd.kernels``) and the
C++ CPU extension ``smsd._C``.

Build with ``pip install -e . --no-build-isolation`` (or ``pip wheel . --no-build-isolation``)
so the extension compiles against the torch that is already installed.
"""

import os
from glob import glob

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension() -> CppExtension:
    sources = sorted(os.path.relpath(p, ROOT) for p in glob(os.path.join(ROOT, "csrc", "*.cpp")))
    return CppExtension(
        name="smsd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=[*find_packages(include=["smsd", "smsd.*"]), "smsd.kernels"],
    package_dir={"smsd.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

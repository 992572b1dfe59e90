"""Builds kdkernels; adds the CUDA C++ extension (csrc/) where a CUDA build of torch and nvcc exist.

    pip install .                          isolated build, no torch inside: pure-Python package
                                           (the extension can still be compiled on first use)
    pip install --no-build-isolation .     against the installed torch: builds kdkernels/_cuda_ops*.so

Environment switches:
    KDKERNELS_SKIP_CUDA_BUILD=1    never build the extension here
    KDKERNELS_CUDA_ARCHS="80;90"   compute capabilities to generate code for (default "80;90";
                                   "90a" etc. accepted); PTX for the last one is embedded too
    MAX_JOBS=N                     parallel compile jobs (ninja, read by torch.utils.cpp_extension)
    NVCC_THREADS=N                 nvcc --threads per job (default 2)

All metadata lives in pyproject.toml; this file only adds the extension and ships the csrc
sources inside the package (kdkernels/_csrc) for the just-in-time build.
"""
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


def _note(msg: str) -> None:
    print(f"kdkernels setup: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as kdkernels/_csrc (wheels carry the JIT sources)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not CSRC.is_dir():
            return  # an editable install finds csrc/ beside the package
        dst = Path(self.build_lib) / "kdkernels" / "_csrc"
        self.mkpath(str(dst))
        for f in sorted(CSRC.iterdir()):
            if f.suffix in SOURCE_SUFFIXES:
                self.copy_file(str(f), str(dst / f.name))


def _arch_flags(archs: str) -> list:
    names = [a.strip().replace(".", "") for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in names]
    if names:
        flags.append(f"-gencode=arch=compute_{names[-1]},code=compute_{names[-1]}")
    return flags


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a note saying why not."""
    if os.environ.get("KDKERNELS_SKIP_CUDA_BUILD", "0") == "1":
        _note("KDKERNELS_SKIP_CUDA_BUILD=1: building without the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _note("torch is not importable here (isolated build?): building without the CUDA extension; "
              "use `pip install --no-build-isolation .` to build it")
        return [], {}
    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} is not a CUDA build: building without the CUDA extension")
        return [], {}
    if not CUDA_HOME or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        _note(f"no nvcc under CUDA_HOME={CUDA_HOME!r}: building without the CUDA extension (set CUDA_HOME)")
        return [], {}
    archs = os.environ.get("KDKERNELS_CUDA_ARCHS", "80;90")
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + ["csrc/bindings.cpp"]
    _note(f"building the CUDA extension for {archs} with {CUDA_HOME}/bin/nvcc")
    ext = CUDAExtension(
        name="kdkernels._cuda_ops",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", f"--threads={nvcc_threads}", *_arch_flags(archs)],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)

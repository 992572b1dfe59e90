"""Builds kdkernels; adds the CUDA C++ extension (csrc/) where a CUDA build of torch and nvcc exist.

    pip install .                          isolated build, no torch inside: pure-Python package
                                           (the extension can still be compiled on first use)
    pip install --no-build-isolation .     against the installed torch: builds kdkernels/_cuda_ops*.so

Environment switches:
    KDKERNELS_SKIP_CUDA_BUILD=1    never build the extension here
    KDKERNELS_CUDA_ARCHS="80;90"   compute capabilities to generate code for (default "80;90";
                                   "90a" etc. accepted); PTX for the last one is embedded too
    TORCH_CUDA_ARCH_LIST="9.0"     used when KDKERNELS_CUDA_ARCHS is unset (torch's spelling:
                                   PTX only for entries with +PTX), e.g. sm_90 alone on an H200
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


def _arch_flags() -> tuple:
    """kdkernels/_cuda_build.py's cuda_arch_flags (loaded by path: no package import here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_kdk_cuda_build", ROOT / "kdkernels" / "_cuda_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cuda_arch_flags("80;90")


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
    flags, origin = _arch_flags()
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + ["csrc/bindings.cpp"]
    _note(f"building the CUDA extension with {CUDA_HOME}/bin/nvcc for {origin}: {' '.join(flags)}")
    ext = CUDAExtension(
        name="kdkernels._cuda_ops",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", f"--threads={nvcc_threads}", *flags],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)

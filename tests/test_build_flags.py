"""Which GPU architectures the CUDA extension is built for: KDKERNELS_CUDA_ARCHS, else
TORCH_CUDA_ARCH_LIST (torch's spelling), else the default; setup.py and the JIT build share it."""
import importlib.util
import os

import pytest

from kdkernels._cuda_build import arch_flags, cuda_arch_flags

SM80, SM90 = "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"
PTX90 = "-gencode=arch=compute_90,code=compute_90"


def test_torch_arch_list_alone_builds_only_what_it_names():
    assert cuda_arch_flags("80;90", {"TORCH_CUDA_ARCH_LIST": "9.0"}) == ([SM90], "TORCH_CUDA_ARCH_LIST=9.0")
    flags, _ = cuda_arch_flags("80;90", {"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"})
    assert flags == [SM80, SM90, PTX90]


def test_kdkernels_archs_win_and_embed_ptx_of_the_last():
    env = {"KDKERNELS_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    assert cuda_arch_flags("80;90", env)[0] == [SM90, PTX90]


def test_default_and_none():
    assert cuda_arch_flags("80;90", {})[0] == [SM80, SM90, PTX90]
    assert cuda_arch_flags(None, {}) == ([], "default")
    assert arch_flags("9.0a", ptx=None) == ["-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="no CUDA architecture"):
        arch_flags(" ; ")


def test_setup_py_uses_the_shared_rule(monkeypatch):
    """setup.py's flags are cuda_arch_flags' (it loads _cuda_build.py by path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = open(os.path.join(root, "setup.py")).read()
    # run only setup.py's _arch_flags (not setup()): everything above the setup() call
    code = src[:src.index("ext_modules, cmdclass = cuda_extension()")]
    ns = {"__file__": os.path.join(root, "setup.py"), "__name__": "setup_probe"}
    exec(compile(code, "setup.py", "exec"), ns)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("KDKERNELS_CUDA_ARCHS", raising=False)
    assert ns["_arch_flags"]() == ([SM90], "TORCH_CUDA_ARCH_LIST=9.0")
    assert importlib.util.find_spec("setuptools") is not None

"""The Triton JIT's specialisation, emulated with the installed Triton's own code, and offline
compilation for sm_90.

A launch (triton_backend.Launch) is specialised the way JITFunction.run does it: the kernel's
binder (triton.runtime.jit.create_function_from_signature with the CUDA backend) turns every
argument into its type and specialisation (pointers: dtype and 16-byte alignment; ints: i32/i64,
== 1 becomes a constexpr, divisible by 16 gets tt.divisibility; floats: fp32, never specialised),
and _pack_args turns that into the (signature, constexprs, attrs, options) that the JIT hands to
triton.compile. Tensors are stand-ins (a dtype and an address): meta tensors carry no storage, so
each gets a 16-byte-aligned base (what PyTorch's allocators return) plus its storage offset.

Both pieces are Triton internals; they exist with these signatures in 3.6.0 and 3.9.0 (the GPU
machine's version and the newest the tests allow). A version that changes them fails loudly
here rather than emulating a different key.
"""
from __future__ import annotations

import inspect
import os
import re
import tempfile

import torch

_BASE = 1 << 20  # stand-in allocation base: aligned to 16 bytes and more


class StandIn:
    """What the JIT reads of a tensor argument: dtype and data_ptr()."""

    def __init__(self, dtype, ptr):
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self):
        return self._ptr

    def __reduce__(self):
        return StandIn, (self.dtype, self._ptr)


def stand_in(x):
    if isinstance(x, torch.Tensor):
        return StandIn(x.dtype, _BASE + x.storage_offset() * x.element_size())
    return x


# The options JITFunction.run adds to the launch's keyword arguments before binding; each line
# `kwargs["name"] = ...` of run() must be one of these (else the emulation would differ).
def _run_options(fn):
    from triton import knobs
    known = {
        "debug": lambda kw: kw.get("debug", fn.debug) or knobs.runtime.debug,
        "instrumentation_mode": lambda kw: knobs.compilation.instrumentation_mode,
        "fpsan_homomorphic_casts": lambda kw: knobs.compilation.fpsan_homomorphic_casts,
    }
    from triton.runtime.jit import JITFunction
    names = re.findall(r'kwargs\["(\w+)"\]\s*=', inspect.getsource(JITFunction.run))
    unknown = [n for n in names if n not in known]
    if unknown:
        import triton
        raise RuntimeError(f"triton {triton.__version__}: JITFunction.run sets options {unknown} that "
                           "kdkernels.report does not emulate; update kdkernels/report/triton_specs.py")
    return [(n, known[n]) for n in names]


def target(device_target: bool = False):
    """sm_90 (an H100/H200), or with device_target the current GPU's target (as the JIT uses)."""
    from triton.backends.compiler import GPUTarget
    if device_target:
        from triton.runtime import driver
        return driver.active.get_current_target()
    return GPUTarget("cuda", 90, 32)


def specialise(launch, tgt):
    """(key, signature, constexprs, attrs, options) of a Launch as the JIT computes them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    backend = make_backend(tgt)
    kwargs = dict(launch.meta)
    for name, value in _run_options(fn):
        kwargs[name] = value(kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*map(stand_in, launch.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = (fn.__name__, repr(spec), repr(sorted(options.__dict__.items())))
    return key, signature, constexprs, attrs, options


def compile_launch(launch, tgt, cubin_dir=None):
    """Compiles a Launch's specialisation (through Triton's cache, as the JIT would).
    Returns (key, cubin path or None, dynamic shared memory bytes, num_warps)."""
    import warnings
    import triton
    from triton.compiler import ASTSource
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    key, signature, constexprs, attrs, options = specialise(launch, tgt)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=tgt,
                              options=options.__dict__)
    path = None
    if cubin_dir is not None:
        fd, path = tempfile.mkstemp(suffix=".cubin", dir=cubin_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(compiled.asm["cubin"])
    return key, path, compiled.metadata.shared, compiled.metadata.num_warps


def triton_version() -> str:
    import triton
    return triton.__version__

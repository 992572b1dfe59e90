"""`python -m kdkernels info` and `python -m kdkernels check`.

info:  versions, devices, and for every backend x device whether it can run (and why not).
check: every backend that runs here against the float64 reference (kdkernels.reference) on
       fresh random inputs: all divergences x {teacher_logits, teacher_probs} x dtypes, with
       labels / ignore_index and hard_weight, loss and gradients (student and teacher). Prints
       a PASS/FAIL table; exit code 1 if any case fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

from . import reference
from .api import kd_loss
from .backends import BACKENDS, DIVERGENCES, module, why_unavailable
from .options import divergence as divergence_info

# (atol, rtol) per input dtype: a tensor passes if max|x - ref| <= atol + rtol * max|ref|.
# The reference sees the same (rounded) inputs, so the budget covers float32 arithmetic and
# the rounding of the gradient to the input dtype (bf16 eps = 2**-8, fp16 eps = 2**-11).
TOLERANCES = {
    torch.float64: (1e-12, 1e-9),
    torch.float32: (1e-6, 2e-5),
    torch.bfloat16: (1e-5, 1.6e-2),
    torch.float16: (1e-6, 2e-3),
}
DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}


# ----------------------------------------------------------------------------- info

def versions() -> dict:
    """Versions of kdkernels, Python, torch, Triton, CUDA and the NVIDIA driver (None if absent)."""
    from . import __version__
    out = {"kdkernels": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "triton": None, "cuda": torch.version.cuda, "driver": None, "liger_kernel": None}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        pass
    try:
        from importlib.metadata import version
        out["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        out["driver"] = _nvidia_smi("driver_version")
    return out


def _nvidia_smi(field: str) -> str | None:
    import subprocess
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def devices() -> list[torch.device]:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


def cuda_extension_status() -> str:
    try:
        mod = module("cuda")
    except RuntimeError as exc:
        return f"absent: {exc}"
    status = getattr(mod, "status", None)
    if status is None:
        return "cuda_backend imports but has no status()"
    try:
        return str(status())
    except Exception as exc:  # noqa: BLE001 - report, do not crash `info`
        return f"status() raised {type(exc).__name__}: {exc}"


def main_info(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels info", description=main_info.__doc__)
    p.parse_args(argv)
    print("versions")
    for k, v in versions().items():
        print(f"  {k:<13} {v if v is not None else '-'}")
    print("environment")
    for k in ("KDKERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST"):
        if k in os.environ:
            print(f"  {k}={os.environ[k]}")
    print("devices")
    print(f"  cpu           {cpu_name()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i:<8} {prop.name}, {prop.total_memory / 2**30:.1f} GiB, "
                  f"sm_{prop.major}{prop.minor}, {prop.multi_processor_count} SMs")
    else:
        print("  cuda          none (torch.cuda.is_available() is False)")
    print("backends")
    for dev in devices():
        for name in BACKENDS:
            reason = why_unavailable(name, dev)
            print(f"  {name:<7} {dev.type:<5} {'runs' if reason is None else 'no: ' + reason}")
    print("cuda extension")
    print(f"  {cuda_extension_status()}")
    return 0


main_info.__doc__ = "Versions, devices, and which backends can run here and why not."


# ----------------------------------------------------------------------------- check

def _inputs(N: int, V: int, dtype, device, teacher_probs: bool, zeros: bool, gen: torch.Generator):
    """Random student logits, teacher logits or probabilities, labels with ignored positions.

    Leading shape (2, N // 2 ...) exercises the (..., V) flattening; `zeros` puts exact zeros
    into the teacher's distribution (-inf logits / 0 probabilities) in a few places.
    """
    shape = (2, N // 2, V) if N % 2 == 0 and N > 1 else (N, V)
    s = (torch.randn(shape, generator=gen) * 3).to(dtype)
    # Probabilities from logits of spread 1 stay above float16's underflow (~6e-8) at any V
    # used here, so that zeros appear only where `zeros` puts them.
    t = torch.randn(shape, generator=gen) * (1.0 if teacher_probs else 3.0)
    if zeros:
        t.view(-1, V)[::3, 1::5] = float("-inf")
    if teacher_probs:
        t = torch.softmax(t, -1)  # exp(-inf) = 0 exactly
    t = t.to(dtype)
    labels = torch.randint(0, V, shape[:-1], generator=gen)
    labels.view(-1)[::4] = -100
    return (s.to(device).requires_grad_(), t.to(device).requires_grad_(), labels.to(device))


# Teacher forms `check` runs: dense logits, dense probabilities, an ensemble of 3 teachers
# (weights 0.5 / 0.3 / 0.2, mixed in the kernel on Triton), an offline top-16 teacher.
TEACHERS = ("logits", "probs", "ensemble", "topk")
_ENSEMBLE_WEIGHTS = [0.5, 0.3, 0.2]
_TOPK = 16


def check_case(backend, device, divergence, teacher, dtype, *, N, V, temperature, gen) -> dict:
    """One backend x case against the reference: loss, d/d student, d/d teacher (the teacher
    logits or probabilities, or a top-k teacher's log-probabilities; ensembles get none)."""
    teacher = {False: "logits", True: "probs"}.get(teacher, teacher)
    # zero teacher probabilities / -inf logits only where the divergence stays finite there
    zeros = divergence_info(divergence).finite_off_support
    s, t, labels = _inputs(N, V, dtype, device, teacher == "probs", zeros, gen)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, hard_weight=0.5,
              ignore_index=-100, soft_weight=0.8)
    sr = s.detach().cpu().double().requires_grad_()
    if teacher == "ensemble":
        ts = [t.detach()] + [_inputs(N, V, dtype, device, False, False, gen)[1].detach() for _ in range(2)]
        tw, tr = None, None
        ref = reference.kd_loss_ensemble(sr, [x.cpu() for x in ts], labels.cpu(),
                                         teacher_weights=_ENSEMBLE_WEIGHTS, **kw)
        loss = kd_loss(s, ts, labels, teacher_weights=_ENSEMBLE_WEIGHTS, backend=backend, **kw)
    elif teacher == "topk":
        from .teachers import topk_teacher
        ids, lp = topk_teacher(t.detach(), min(_TOPK, V))
        tw = lp.to(dtype).requires_grad_()
        tr = tw.detach().cpu().double().requires_grad_()
        ref = reference.kd_loss_topk(sr, ids.cpu(), tr, labels.cpu(), **kw)
        loss = kd_loss(s, labels=labels, teacher_topk_ids=ids, teacher_topk_logprobs=tw, backend=backend, **kw)
    else:
        tkey = "teacher_probs" if teacher == "probs" else "teacher_logits"
        tw, tr = t, t.detach().cpu().double().requires_grad_()
        ref = reference.kd_loss(sr, labels=labels.cpu(), **{tkey: tr}, **kw)
        loss = kd_loss(s, labels=labels, **{tkey: t}, backend=backend, **kw)
    (ref * 1.7).backward()  # grad_output != 1: the loss is not the last layer
    (loss * 1.7).backward()
    atol, rtol = TOLERANCES[dtype]
    errs, worst = {}, 0.0
    pairs = [("loss", loss.detach(), ref.detach()), ("grad_student", s.grad, sr.grad)]
    if tw is not None:
        pairs.append(("grad_teacher", tw.grad, tr.grad))
    else:
        errs["grad_teacher"] = None  # ensembles: teachers get no gradient
    for name, x, r in pairs:
        x, r = x.cpu().double(), r.double()
        finite = torch.isfinite(r)
        # Non-finite reference entries (none expected here) must be matched exactly.
        same_nonfinite = bool((x[~finite] == r[~finite]).all()) if (~finite).any() else True
        err = float((x[finite] - r[finite]).abs().max()) if finite.any() else 0.0
        scale = float(r[finite].abs().max()) if finite.any() else 0.0
        errs[name] = err if same_nonfinite and not torch.isnan(x[finite]).any() else float("nan")
        ratio = errs[name] / (atol + rtol * scale)
        if ratio != ratio or (worst == worst and ratio > worst):  # a NaN sticks
            worst = ratio
    return {"status": "PASS" if worst <= 1.0 else "FAIL", "err/tol": worst, **errs}


def _check_dtypes(backend: str, device: torch.device, requested) -> list:
    if requested:
        return [DTYPE_NAMES[d] for d in requested]
    dts = [torch.float32, torch.bfloat16, torch.float16]
    return dts + [torch.float64] if backend == "torch" else dts


def check_backends(device: torch.device, requested: str | None) -> tuple[list[str], list[str]]:
    """(backends to check, lines saying why the others are left out)."""
    names = [requested] if requested else list(BACKENDS)
    run, skipped = [], []
    for name in names:
        reason = why_unavailable(name, device)
        if reason is None and name == "triton" and device.type == "cpu" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "on CPU only under the Triton interpreter (set TRITON_INTERPRET=1)"
        (run if reason is None else skipped).append(name if reason is None else f"{name}: {reason}")
    return run, skipped


def main_check(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels check",
                                description="Every backend that runs here against the float64 reference.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="check only this backend")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh, printed)")
    p.add_argument("--N", type=int, default=24, help="positions (rows), default 24")
    p.add_argument("--V", type=int, default=517, help="vocabulary size, default 517 (odd on purpose)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPE_NAMES))
    p.add_argument("--teacher", nargs="+", default=list(TEACHERS), choices=TEACHERS,
                   help="teacher forms (default: all; top-k skips reverse_kl, which is infinite for it)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    # The Triton interpreter evaluates masked-off lanes too (log(0), 0/0 in numpy): noise only.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    gen = torch.Generator().manual_seed(seed)
    backends, skipped = check_backends(device, args.backend)
    print(f"kdkernels check on {device} ({device_name(device)}), seed {seed}, N={args.N} V={args.V} "
          f"T={args.temperature}, labels with ignore_index, hard_weight=0.5, grad_output=1.7")
    for line in skipped:
        print(f"  not checked: {line}")
    if not backends:
        print("no backend to check", file=sys.stderr)
        return 1
    head = f"{'backend':<7} {'divergence':<10} {'teacher':<8} {'dtype':<8} {'result':<6} " \
           f"{'loss err':>9} {'grad_s err':>10} {'grad_t err':>10} {'err/tol':>8}"
    print(head)
    print("-" * len(head))
    failed = n = 0
    t0 = time.perf_counter()
    for backend in backends:
        for dtype in _check_dtypes(backend, device, args.dtype):
            for divergence in args.divergence:
                for teacher in args.teacher:
                    if teacher == "topk" and not divergence_info(divergence).finite_off_support:
                        continue  # infinite against a top-k teacher ("full" mode)
                    n += 1
                    try:
                        r = check_case(backend, device, divergence, teacher, dtype, N=args.N, V=args.V,
                                       temperature=args.temperature, gen=gen)
                    except NotImplementedError as exc:
                        r = {"status": "N/A", "note": str(exc).splitlines()[0][:60]}
                    except Exception as exc:  # noqa: BLE001 - a crash is a failure, keep going
                        r = {"status": "FAIL", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"}
                    failed += r["status"] == "FAIL"
                    errs = " ".join(f"{r[k]:>{w}.2e}" if r[k] is not None else f"{'-':>{w}}" for k, w in
                                    (("loss", 9), ("grad_student", 10), ("grad_teacher", 10), ("err/tol", 8))) \
                        if "loss" in r else r.get("note", "")
                    print(f"{backend:<7} {divergence:<10} {teacher:<8} "
                          f"{str(dtype).replace('torch.', ''):<8} {r['status']:<6} {errs}", flush=True)
    print(f"{n - failed}/{n} cases passed ({time.perf_counter() - t0:.1f} s); "
          f"pass: err/tol <= 1 for loss and both gradients, tol = atol + rtol * max|ref|, (atol, rtol) = "
          + ", ".join(f"{str(d).replace('torch.', '')} ({a:g}, {r:g})" for d, (a, r) in TOLERANCES.items()))
    return 1 if failed else 0

"""What bench/gpu_run.sh runs, as data: the cases of its smoke, benchmark, tuning and GPU
correctness stages. One list feeds the stages (tests/test_gpu_run.py, kdkernels.bench.tune) and
the Triton precompile, which builds each case's launches with the launcher's own code
(kdkernels.report.cases) and compiles the distinct specialisations into Triton's cache in
parallel before any stage needs them.

Two scales: "gpu" (real sizes, on the GPU machine) and "tiny" (CPU, Triton's interpreter, small
launch-rule overrides so that the same code paths run: what `gpu_run.sh --cpu-smoke` and CI use).

    python -m kdkernels.bench.gpu_plan count                # distinct specialisations (dry run)
    python -m kdkernels.bench.gpu_plan precompile --jobs 16 # compile them into Triton's cache
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..report.cases import HEADLINE_V, Case, kd_case

BENCH_SIZES = ((16384, 128256), (8192, 32000), (8192, 262144))   # kdkernels bench's GPU_SIZES
FUSED_LINEAR = dict(N=8192, H=4096, V=128256)                      # issue 5's fused lm_head case
# bench/fused_linear_memory.py ignores every 7th position; the fused path projects only the others
FUSED_LINEAR_VALID = FUSED_LINEAR["N"] - -(-FUSED_LINEAR["N"] // 7)
TUNE_V = (32000, 128256, 262144)
TUNE_TRITON = ((4096, 8), (2048, 4), (2048, 8), (8192, 8), (8192, 16))  # (BLOCK, num_warps); the rule's first
TUNE_CUDA = ("auto", "nocluster", "twopass")
# tiny scale: launch-rule overrides that make V = 37 / 300 stream in blocks and split rows
TINY_RULE = dict(one_block_max=16, loop_block=16, min_split_blocks=2, programs_per_sm=4)
TINY_TUNE = ((32, 1), (64, 2), (128, 4))


def scale() -> str:
    """KDKERNELS_GPU_RUN_SCALE, else "gpu" where CUDA is available, else "tiny"."""
    s = os.environ.get("KDKERNELS_GPU_RUN_SCALE")
    if s:
        if s not in ("gpu", "tiny"):
            raise ValueError(f"KDKERNELS_GPU_RUN_SCALE={s!r} is not 'gpu' or 'tiny'")
        return s
    import torch
    return "gpu" if torch.cuda.is_available() else "tiny"


def _tiny(c: Case) -> Case:
    c.params.setdefault("tuning", dict(TINY_RULE))
    return c


def smoke_cases(sc: str) -> list:
    """Every backend once against the reference, at V = 128256 (tiny: 300)."""
    N, V = (600, 128256) if sc == "gpu" else (3, 100)
    out = [kd_case("kl", V, N=N, hard_weight=0.5), kd_case("jsd", V, N=N, teacher_grad=True)]
    return out if sc == "gpu" else [_tiny(c) for c in out]


def subset_cases(sc: str) -> dict:
    """The GPU correctness subset, by test: {name: [Case]}. What the interpreter cannot check:
    real vocabulary sizes in both launch regimes, N*V > 2**31 in bf16, cross-backend agreement,
    the top-k / ensemble / softmax kernels at real sizes (determinism and the CUDA paths reuse
    these cases)."""
    if sc == "gpu":  # N = 600 > 4 programs x 132 SMs: one program per row; N = 8: split rows
        Vs, split_Vs, N, few, big = HEADLINE_V, (50257, 151936, 262144), 600, 8, (16800, 128256)  # > 2**31
    else:
        Vs, split_Vs, N, few, big = (37,), (100,), 3, 2, (3, 100)
    divs = ("kl", "soft_ce", "reverse_kl", "jsd")
    out = {
        "vocab": [kd_case(d, V, N=N, teacher_grad=tg) for V in Vs for d in divs for tg in (False, True)],
        "split": [kd_case(d, V, N=few, teacher_grad=d == "jsd") for V in split_Vs for d in ("kl", "jsd")],
        "large": [kd_case("kl", big[1], N=big[0])],
        "other": [Case("top-k teacher k=64, kl", "topk", N, Vs[-1] if sc == "tiny" else 128256,
                       dict(k=min(64, Vs[0]), divergence="kl")),
                  Case("ensemble of 2 teachers, kl", "ensemble", N, Vs[-1] if sc == "tiny" else 128256,
                       dict(divergence="kl", teachers=2)),
                  Case("log_softmax forward", "softmax_fwd", N, Vs[-1] if sc == "tiny" else 128256, dict(log=True)),
                  Case("log_softmax backward", "softmax_bwd", N, Vs[-1] if sc == "tiny" else 128256, dict(log=True))],
    }
    if sc == "tiny":
        out = {k: [_tiny(c) for c in v] for k, v in out.items()}
    return out


def bench_cases(sc: str) -> list:
    """kdkernels bench's kd:triton runs (kl, T = 2, bf16, no labels), the fused-linear
    benchmark's (the unfused kd_loss, its 8-row warm-up, and the fused chunks, whose logits are
    float32: the fused path never rounds logits to half precision) and stage "trl"'s
    (bench/trl_divergence.py: jsd at beta 0 / 0.5 / 1, which run as kl / jsd / reverse_kl, no
    labels; bench/fused_linear_ignored.py: kl with labels), all on 512-row float32 chunks, and
    kdkernels bench --small's classification sizes."""
    if sc == "tiny":
        return [_tiny(kd_case("kl", 1000, N=8, labels=False))]
    out = [kd_case("kl", V, N=N, labels=False) for N, V in BENCH_SIZES]
    fl = FUSED_LINEAR
    facts = device_facts()
    rows = facts["fused_chunk_rows"] if facts else _fused_chunk_rows_h200(fl["N"], fl["H"])
    out += [kd_case("kl", fl["V"], N=fl["N"], hard_weight=0.5), kd_case("kl", 8, N=8, hard_weight=0.5)]
    f32 = dict(dtype=torch.float32)
    out += [kd_case("kl", fl["V"], N=r, hard_weight=0.5, **f32) for r in sorted({rows, FUSED_LINEAR_VALID % rows} - {0})]
    out += [kd_case(d, fl["V"], N=rows, labels=False, **f32) for d in ("kl", "jsd", "reverse_kl")]
    out += [kd_case("kl", fl["V"], N=rows, **f32)]
    # the stage's second command, kdkernels bench --small (kdkernels.bench.small: kl, T = 4, hard 0.5, fp32)
    from .small import HARD, SIZES, TEMPERATURE
    out += [kd_case("kl", V, N=N, hard_weight=HARD, temperature=TEMPERATURE, **f32) for N, V in SIZES]
    return out


def _fused_chunk_rows_h200(N: int, H: int) -> int:
    """fused_linear.auto_chunk_size's rows on an empty H200 (free memory is no limit there)."""
    from ..fused_linear import GPU_MIN_ROWS
    rows = max(GPU_MIN_ROWS, H // 8)
    return rows - rows % 64 if 64 <= rows < N else min(N, rows)


def tune_cases(sc: str) -> list:
    """(V, Case for each divergence, [(block, warps)]) timed by kdkernels.bench.tune."""
    if sc == "tiny":
        return [(100, [_tiny(kd_case(d, 100, N=3, teacher_grad=d == "jsd")) for d in ("kl", "jsd")], TINY_TUNE)]
    return [(V, [kd_case(d, V, N=16384, teacher_grad=d == "jsd") for d in ("kl", "jsd")], TUNE_TRITON)
            for V in TUNE_V]


def _with_config(c: Case, block: int, warps: int) -> Case:
    p = dict(c.params)
    p["tuning"] = {**p.get("tuning", {}), "loop_block": block, "num_warps": warps}
    return Case(c.name, c.family, c.N, c.V, p, c.headline)


def all_cases(sc: str) -> list:
    out = smoke_cases(sc) + bench_cases(sc)
    out += [c for cs in subset_cases(sc).values() for c in cs]
    for _, cs, configs in tune_cases(sc):
        out += [_with_config(c, b, w) for c in cs for b, w in configs]
    return out


_FACTS: list = []
_FACTS_CODE = r"""
import json, torch
from kdkernels.bench.gpu_plan import FUSED_LINEAR as F
from kdkernels.fused_linear import auto_chunk_size
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    rows = auto_chunk_size(F["N"], F["V"], torch.bfloat16, torch.device("cuda"), hidden=F["H"])
    print(json.dumps(dict(sms=p.multi_processor_count, device_name=torch.cuda.get_device_name(0),
                          capability=10 * p.major + p.minor, fused_chunk_rows=rows)))
else:
    print("null")
"""


def device_facts() -> dict | None:
    """GPU 0's SM count, name, compute capability and the fused-linear chunk rows there (None
    without a GPU), read once in a child process: this one forks compile workers, so it must
    not initialise CUDA itself."""
    if not _FACTS:
        import json
        import subprocess
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        r = subprocess.run([sys.executable, "-c", _FACTS_CODE], capture_output=True, text=True, env=env)
        _FACTS.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip()
                      else None)
    return _FACTS[0]


def _rule_and_target():
    """(launch-rule device facts, compile target): this GPU's, or an H200's without one."""
    from triton.backends.compiler import GPUTarget
    facts = device_facts()
    if facts is None:
        return None, GPUTarget("cuda", 90, 32)
    return dict(sms=facts["sms"], device_name=facts["device_name"]), GPUTarget("cuda", facts["capability"], 32)


def launches(sc: str) -> list:
    rule, _ = _rule_and_target()
    return [launch for c in all_cases(sc) for launch in c.launches(rule)]


def distinct(sc: str) -> dict:
    """{specialisation key: Launch} over every case of the run."""
    from ..report.triton_specs import specialise
    _, tgt = _rule_and_target()
    out = {}
    for launch in launches(sc):
        out.setdefault(specialise(launch, tgt)[0], launch)
    return out


_TODO: list = []  # (Launch, target) per job, inherited by the forked workers


def _compile(i):
    from ..report.triton_specs import compile_launch
    t0 = time.time()
    try:
        compile_launch(*_TODO[i])
        return i, time.time() - t0, None
    except Exception as exc:  # noqa: BLE001 - report and go on: the JIT will try again
        return i, time.time() - t0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def precompile(sc: str, jobs: int, limit: int | None = None) -> int:
    """Compiles every distinct specialisation (the first `limit`) into Triton's cache; prints one
    line per failure."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    t0 = time.time()
    todo = distinct(sc)
    names = list(todo)[:limit]
    _, tgt = _rule_and_target()
    _TODO[:] = [(todo[k], tgt) for k in names]
    failed = 0
    with ProcessPoolExecutor(max(1, min(jobs, len(_TODO))), mp_context=get_context("fork")) as pool:
        for i, secs, err in pool.map(_compile, range(len(_TODO))):
            if err:
                failed += 1
                print(f"precompile FAILED {names[i][0]}: {err}", flush=True)
    print(f"precompiled {len(_TODO) - failed}/{len(_TODO)} Triton specialisations ({sc} scale) with {jobs} "
          f"processes in {time.time() - t0:.1f} s", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels.bench.gpu_plan")
    p.add_argument("what", choices=("count", "precompile"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--scale", choices=("gpu", "tiny"), default=None)
    p.add_argument("--limit", type=int, default=None, help="compile only the first N (a smoke test)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_plan: unset TRITON_INTERPRET (the precompile needs compiled Triton)", file=sys.stderr)
        return 2
    import warnings
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    sc = args.scale or scale()
    if args.what == "count":
        print(len(distinct(sc)))
        return 0
    return precompile(sc, args.jobs, args.limit)


if __name__ == "__main__":
    sys.exit(main())

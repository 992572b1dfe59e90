"""CUDA C++ half of the kernel report: the csrc kernels compiled for sm_90 with nvcc alone
(nvcc -Xptxas -v: registers, spills, shared memory; cuobjdump / nvdisasm: the SASS), with the
flags torch's CUDAExtension and setup.py use, and the launch plan the host code would choose on an
H200 (kd_choose_plan, emulated below; a GPU run checks the emulation against the real one).

The fused KD kernel is a template (csrc/kd_fused.cuh) that kd_<divergence>.cu instantiate for
every dtype pair; the report compiles exactly the bf16 / bf16 / logits instantiations through a
one-line translation unit each. kd_topk.cu and softmax.cu are compiled whole.

SASS per column (see sass.py): a pass loop is an innermost loop whose hot path moves row data in
16-byte packs (LDG.E.128 or LDS.128); its columns per thread per iteration are the bytes those
loads bring divided by the bytes a column needs (s and t: 4 in bf16). The CUDA kernels branch
between a vector and a scalar path, and on runtime options (hard labels, teacher gradient), so
their per-column counts follow the longest vector path (an upper bound: every option on) and
are given with the shortest vector path (a lower bound: every optional branch skipped, the
early-outs of the online max included).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import sass

# setup.py's and torch.utils.cpp_extension's nvcc flags (as in .ci/compile_cuda.sh), sm_90 only.
FLAGS = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
         "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v"]
DIVS = ("kl", "soft_ce", "reverse_kl", "jsd")

# H200 device attributes kd_choose_plan reads (cudaDevAttrMaxSharedMemoryPerMultiprocessor,
# ...PerBlockOptin); the GPU run compares this emulation with cuda_backend.plan().
SMEM_PER_SM = 233472
SMEM_OPTIN = 232448


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.access(path, os.X_OK) else None


def csrc_dir() -> Path:
    from .._cuda_build import source_dir
    d = source_dir()
    if d is None:
        raise FileNotFoundError("csrc sources not found beside the package")
    return d


def kernels(quick: bool = False) -> list:
    """(label, divergence or None, translation unit: ('tu', text) or ('file', name), symbol regex)."""
    out = [(f"kd_fwd_bwd_kernel<bf16, bf16, {d}, logits>", d,
            ("tu", f'#include "kd_fused.cuh"\nnamespace kdk {{ template __global__ void kd_fwd_bwd_kernel'
                   f'<__nv_bfloat16, __nv_bfloat16, {i}, false>(const KdParams); }}\n'),
            rf"kd_fwd_bwd_kernelI13__nv_bfloat16S\d_Li{i}ELb0E")
           for i, d in enumerate(DIVS) if not quick or d == "kl"]
    if not quick:
        out += [(f"kd_topk_kernel<bf16, {d}>", d, ("file", "kd_topk.cu"), rf"kd_topk_kernelI13__nv_bfloat16Li{i}E")
                for i, d in ((0, "kl"), (3, "jsd"))]
    out += [(f"softmax_fwd_kernel<bf16, log={int(log)}>", None, ("file", "softmax.cu"),
             rf"softmax_fwd_kernelI13__nv_bfloat16Lb{int(log)}E") for log in (False, True)]
    if not quick:
        out += [(f"softmax_bwd_kernel<bf16, log={int(log)}>", None, ("file", "softmax.cu"),
                 rf"softmax_bwd_kernelI13__nv_bfloat16Lb{int(log)}E") for log in (False, True)]
    return out


def _ptxas_info(log: str) -> dict:
    """{mangled name: {regs, spill_stores, spill_loads, stack, smem}} from ptxas -v output."""
    info, name = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            name = m.group(1)
            info.setdefault(name, {})
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[name]["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            info[name]["smem"] = int(sm.group(1)) if sm else 0
    return info


def compile_all(tools: dict, quick: bool = False, jobs: int | None = None) -> dict:
    """{label: kernel facts} for the CUDA kernels (an 'error' entry per kernel if nvcc fails)."""
    exe = nvcc()
    if exe is None:
        return {"error": "nvcc not found (PATH, $CUDA_HOME/bin): CUDA kernels not reported"}
    src = csrc_dir()
    ks = kernels(quick)
    units = {}
    for label, _, unit, _ in ks:
        units.setdefault(unit, []).append(label)
    with tempfile.TemporaryDirectory() as d:
        def build(unit):
            kind, what = unit
            if kind == "tu":
                path = os.path.join(d, f"tu{abs(hash(what))}.cu")
                Path(path).write_text(what)
            else:
                path = str(src / what)
            cubin = os.path.join(d, f"{abs(hash(unit))}.cubin")
            r = subprocess.run([exe, *FLAGS, f"-I{src}", "-cubin", "-o", cubin, path],
                               capture_output=True, text=True)
            if r.returncode != 0:
                return unit, None, r.stderr[-2000:]
            return unit, cubin, r.stdout + r.stderr

        with ThreadPoolExecutor(max(1, min(jobs or os.cpu_count() or 1, len(units)))) as pool:
            built = list(pool.map(build, units))
        out = {}
        for unit, cubin, log in built:
            for label, div, _, pattern in (k for k in ks if k[2] == unit):
                if cubin is None:
                    out[label] = {"error": f"nvcc failed: {log}"}
                    continue
                funcs = sass.disassemble(tools["nvdisasm"], cubin)
                res = sass.resource_usage(tools["cuobjdump"], cubin)
                ptx = _ptxas_info(log)
                name = next(n for n in funcs if re.search(pattern, n))
                out[label] = _analyse(label, div, funcs[name], res[name], ptx.get(name, {}))
    return out


def _load_bytes_per_col(label: str) -> int:
    # bytes of row data one column needs in a pass, bf16: s and t (kd), s (top-k), x (softmax
    # forward), y and grad_y (softmax backward)
    return 2 if label.startswith(("kd_topk", "softmax_fwd")) else 4


def _analyse(label, div, fn, res, ptx) -> dict:
    per_load = _load_bytes_per_col(label)
    # row data comes from global memory, and in the fused kernel's resident plans from its slice
    # in shared memory (the top-k kernel's shared memory holds the k entries, not the row)
    row_loads = ("LDG", "LDS") if label.startswith("kd_fwd") else ("LDG",)
    passes = []
    for lp in sass.innermost_loops(fn):
        wide = sum(16 for i in lp.instrs if sass.wide(i) and i.base in row_loads)
        if not wide:
            continue
        m = sass.mix(lp.instrs)
        if label.startswith("kd_fwd"):  # pass 1 copies the slice on chip, pass 3 writes gradients
            kind = "stats" if any(i.base == "STS" and sass.wide(i) for i in lp.instrs) else \
                "gradient" if m["store_bytes"] else "divergence"
        else:
            kind = f"pass {len(passes) + 1}"
        passes.append({"kind": kind, "cols_per_thread": wide / per_load, "body_all_paths": lp.size_all,
                       "shortest": lp.shortest, **m})
    return {"label": label, "divergence": div, "regs": res["REG"], "local_bytes": res["LOCAL"],
            "stack_bytes": res["STACK"], "static_smem": res["SHARED"], "spill_stores": ptx.get("spill_stores"),
            "spill_loads": ptx.get("spill_loads"), "ptxas_regs": ptx.get("regs"),
            "local_ops": sass.local_memory_ops(fn), "passes": passes}


def kd_plan(V: int, static_smem: int, es_s: int = 2, es_t: int = 2, max_cluster: int = 8) -> dict:
    """csrc/kd_launch.cu kd_choose_plan for an H200 (cluster size, residency, threads, smem)."""
    def slice_for(C):
        return -(-(-(-V // C)) // 8) * 8

    def smem_for(sl):
        return -(-sl * es_s // 16) * 16 + -(-sl * es_t // 16) * 16

    def threads_for(sl):
        return 512 if sl >= 16384 else 256 if sl >= 4096 else 128

    static = static_smem - 1024  # cuobjdump's SHARED includes the 1 KB system reserve
    max_dyn = SMEM_OPTIN - static
    target = SMEM_PER_SM // 2 - static - 1024
    chosen = 0
    for limit in (target, max_dyn):
        for C in (1, 2, 4, 8):
            if C <= max_cluster and smem_for(slice_for(C)) <= limit:
                chosen = C
                break
        if chosen:
            break
    if not chosen:
        sl = slice_for(1)
        return {"cluster": 1, "resident": False, "slice": sl, "smem": 0, "threads": threads_for(sl)}
    sl = slice_for(chosen)
    return {"cluster": chosen, "resident": True, "slice": sl, "smem": smem_for(sl), "threads": threads_for(sl)}


def row_threads(label: str, V: int) -> int:
    """Threads per CTA of the one-CTA-per-row kernels (kd_topk.cu, softmax.cu)."""
    if label.startswith("softmax"):
        return 512 if V >= 16384 else 256 if V >= 2048 else 128
    return 512 if V >= 16384 else 256 if V >= 4096 else 128


def case_rows(facts: dict, cases: list) -> list:
    """Per report case that has a CUDA kernel (kd, top-k, softmax; not ensembles, which the CUDA
    backend forms per chunk): the kernel, the H200 plan and the predictions."""
    rows = []
    for c in cases:
        label = _label_for(c)
        if label is None or label not in facts or "error" in facts[label]:
            continue
        k = facts[label]
        if c.family == "kd":
            tg = c.params.get("teacher_grad", False)
            plan = kd_plan(c.V, k["static_smem"])
            need_d = c.params["divergence"] in ("reverse_kl", "jsd") or tg
            passes = [p for p in k["passes"] if p["kind"] != "divergence" or need_d]
            threads, smem, rows_per_wave_div = plan["threads"], k["static_smem"] + plan["smem"], plan["cluster"]
            span = plan["slice"] * plan["cluster"]
        else:
            plan = None
            passes, threads, smem, rows_per_wave_div, span = k["passes"], row_threads(label, c.V), k["static_smem"], 1, c.V
        occ = sass.occupancy(k["regs"], threads, smem)
        in_flight = min(c.N, occ["ctas_per_sm"] * sass.SMS // rows_per_wave_div)
        per_col = {n: 0.0 for n in ("instructions", "shortest", "mufu", "ex2", "bar", "shfl", "global_load_bytes",
                                    "store_bytes")}
        for p in passes:
            for n in per_col:
                per_col[n] += p[n] / p["cols_per_thread"]
        if plan is not None and plan["resident"]:  # one read of s and t, then the slices stay on chip
            hbm = 4 + 2 + (2 if c.params.get("teacher_grad") else 0)
        else:
            per_load = _load_bytes_per_col(label)
            refits = in_flight * span * per_load <= sass.L2_BUDGET
            writes = 2 + (2 if c.params.get("teacher_grad") else 0) if c.family == "kd" else 2
            hbm = per_load * (1 if refits else len(passes)) + writes
        floors = sass.floors_ms(c.elements, hbm, per_col["mufu"], per_col["instructions"])
        rows.append({"backend": "cuda", "case": c.name, "family": c.family, "N": c.N, "V": c.V,
                     "headline": c.headline, "kernel": label, "plan": plan, "threads": threads, "regs": k["regs"],
                     "spill_stores": k["spill_stores"], "spill_loads": k["spill_loads"], "local_bytes": k["local_bytes"],
                     "local_ops": k["local_ops"], "smem_bytes": smem, **occ, "passes": [p["kind"] for p in passes],
                     "loop_memory_ops": [p["memory"] for p in passes], "per_column": per_col,
                     "hbm_bytes_per_elem": hbm, **floors,
                     "bound": max(("memory", floors["memory_ms"]), ("mufu", floors["mufu_ms"]),
                                  ("issue", floors["issue_ms"]), key=lambda x: x[1])[0]})
    return rows


def _label_for(c) -> str | None:
    if c.family == "kd" and "teacher_stride" not in c.params and not c.params.get("hard_weight") and c.N >= 1024:
        return f"kd_fwd_bwd_kernel<bf16, bf16, {c.params['divergence']}, logits>"
    if c.family == "topk":
        return f"kd_topk_kernel<bf16, {c.params['divergence']}>"
    if c.family in ("softmax_fwd", "softmax_bwd"):
        return f"{c.family}_kernel<bf16, log={int(c.params['log'])}>"
    return None

"""Triton half of the kernel report: cases -> launches -> specialisations (deduplicated) ->
sm_90 cubins (compiled in parallel) -> SASS analysis -> per-case predictions."""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from . import sass
from .triton_specs import compile_launch, specialise, target

_JOBS: list = []  # (launch) per distinct specialisation; inherited by forked workers


def tools() -> dict:
    """nvdisasm and cuobjdump: Triton's wheel ships them (no CUDA toolkit needed)."""
    import triton.backends.nvidia as nv
    bin_dir = os.path.join(os.path.dirname(nv.__file__), "bin")
    found = {t: os.path.join(bin_dir, t) for t in ("nvdisasm", "cuobjdump")}
    for t, p in found.items():
        if not os.access(p, os.X_OK):
            raise FileNotFoundError(f"{t} not found at {p} (it ships with triton's NVIDIA backend)")
    return found


def _compile_job(args):
    i, cubin_dir = args
    key, path, shared, warps = compile_launch(_JOBS[i], target(), cubin_dir)
    t = tools()
    fn_name = _JOBS[i].kernel.__name__
    funcs = sass.disassemble(t["nvdisasm"], path)
    res = sass.resource_usage(t["cuobjdump"], path)
    name = next(n for n in funcs if n == fn_name or n.startswith(fn_name))
    return i, analyse_kernel(funcs[name], res[name], _JOBS[i].meta, warps, shared)


def analyse_kernel(fn, res, meta, num_warps, dyn_smem) -> dict:
    """Per-kernel facts: resources, and per vocabulary pass its hot-loop counts per iteration."""
    threads = 32 * num_warps
    loops = [lp for lp in sass.innermost_loops(fn) if any(i.base in ("LDG", "LDGSTS") for i in lp.instrs)]
    passes = []
    if loops:
        for lp in loops:
            passes.append({"cols_per_thread": meta["BLOCK"] / threads, "body_all_paths": lp.size_all,
                           **sass.mix(lp.instrs)})
    else:  # the whole row in one block: the function's path, once
        passes.append({"cols_per_thread": None, "body_all_paths": len(fn.instrs),
                       **sass.mix(sass.straight_path(fn))})
    return {"regs": res["REG"], "local_bytes": res["LOCAL"], "stack_bytes": res["STACK"],
            "static_smem": res["SHARED"], "dyn_smem": dyn_smem, "num_warps": num_warps,
            "local_ops": sass.local_memory_ops(fn), "passes": passes}


def compile_all(launches: list, jobs: int | None = None) -> dict:
    """{specialisation key: kernel analysis} for the distinct specialisations of `launches`."""
    tgt = target()
    keys, todo = [], {}
    for launch in launches:
        key = specialise(launch, tgt)[0]
        keys.append(key)
        todo.setdefault(key, launch)
    _JOBS[:] = list(todo.values())
    key_list = list(todo)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        work = [(i, d) for i in range(len(_JOBS))]
        n = max(1, min(jobs or os.cpu_count() or 1, len(work)))
        if n == 1:
            out = map(_compile_job, work)
        else:
            pool = ProcessPoolExecutor(n, mp_context=get_context("fork"))
            out = pool.map(_compile_job, work)
        for i, res in out:
            results[key_list[i]] = res
        if n > 1:
            pool.shutdown()
    return {"keys": keys, "kernels": results}


def case_rows(cases: list, jobs: int | None = None) -> list:
    """One dict per case: its launches' kernels and the predictions at the case's size."""
    per_case = [c.launches() for c in cases]
    flat = [launch for ls in per_case for launch in ls]
    compiled = compile_all(flat, jobs)
    rows, k = [], 0
    for case, launches in zip(cases, per_case):
        parts = []
        for launch in launches:
            key = compiled["keys"][k]
            k += 1
            parts.append(_launch_part(case, launch, key, compiled["kernels"][key]))
        rows.append(_combine(case, parts))
    return rows


def _launch_part(case, launch, key, kern) -> dict:
    threads = 32 * kern["num_warps"]
    smem = kern["static_smem"] + kern["dyn_smem"]
    occ = sass.occupancy(kern["regs"], threads, smem)
    programs = 1
    for g in launch.grid:
        programs *= g
    in_flight = min(programs, occ["ctas_per_sm"] * sass.SMS)
    one_block = kern["passes"][0]["cols_per_thread"] is None
    span = case.V if one_block else _span(launch, case)
    per_col, hbm = _zero(), 0.0
    for j, p in enumerate(kern["passes"]):
        cols = case.V / threads if one_block else p["cols_per_thread"]
        for name in per_col:
            per_col[name] += p[name] / cols
        loads, stores = p["global_load_bytes"] / cols, p["store_bytes"] / cols
        if j == 0:
            first_loads = loads
            hbm += loads
        elif in_flight * span * first_loads > sass.L2_BUDGET:
            hbm += loads  # the re-read misses L2
        hbm += stores
    meta = {k: v for k, v in launch.meta.items() if k in ("PHASE", "BLOCK", "ONE_BLOCK", "NT", "KBLOCK", "LOG")}
    return {"kernel": key[0], "meta": meta, "grid": list(launch.grid), "regs": kern["regs"],
            "local_bytes": kern["local_bytes"], "local_ops": kern["local_ops"], "stack_bytes": kern["stack_bytes"],
            "smem_bytes": smem, "num_warps": kern["num_warps"], **occ, "programs_in_flight": in_flight,
            "passes": len(kern["passes"]), "per_column": per_col, "hbm_bytes_per_elem": hbm,
            "loop_memory_ops": [p["memory"] for p in kern["passes"]],
            "loop_instructions": [p["instructions"] for p in kern["passes"]],
            "cols_per_thread": [None if one_block else p["cols_per_thread"] for p in kern["passes"]]}


def _span(launch, case) -> int:
    """Columns one program streams (the row, or its split's span)."""
    if len(launch.grid) > 1 and launch.grid[1] > 1:
        return -(-case.V // launch.grid[1])
    return case.V


def _zero() -> dict:
    return {"instructions": 0.0, "mufu": 0.0, "ex2": 0.0, "bar": 0.0, "shfl": 0.0, "global_load_bytes": 0.0,
            "store_bytes": 0.0}


def _combine(case, parts) -> dict:
    per_col = _zero()
    for p in parts:
        for k in per_col:
            per_col[k] += p["per_column"][k]
    hbm = sum(p["hbm_bytes_per_elem"] for p in parts)
    floors = sass.floors_ms(case.elements, hbm, per_col["mufu"], per_col["instructions"])
    return {"backend": "triton", "case": case.name, "family": case.family, "N": case.N, "V": case.V,
            "headline": case.headline, "launches": parts, "per_column": per_col, "hbm_bytes_per_elem": hbm,
            **floors, "bound": max(("memory", floors["memory_ms"]), ("mufu", floors["mufu_ms"]),
                                   ("issue", floors["issue_ms"]), key=lambda x: x[1])[0]}

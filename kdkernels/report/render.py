"""Markdown for the kernel report (the JSON is the rows themselves)."""
from __future__ import annotations

from . import sass


def _mem(ops: dict, kinds=("LDG", "STG")) -> str:
    return ", ".join(f"{op}x{n}" for op, n in ops.items() if op.split(".")[0] in kinds) or "-"


def _spills(row_or_launch) -> str:
    bad = row_or_launch.get("local_bytes") or row_or_launch.get("local_ops") or row_or_launch.get("spill_stores")
    return "none" if not bad else f"LOCAL {row_or_launch.get('local_bytes')} B, {row_or_launch.get('local_ops')} LDL/STL"


def _f(x, d=1):
    return f"{x:.{d}f}"


def _ms(r):
    return f"{_f(r['memory_ms'], 2)} / {_f(r['mufu_ms'], 2)} / {_f(r['issue_ms'], 2)}"


def _triton_table(rows) -> list:
    out = ["| case | V | launches (PHASE, BLOCK, num_warps) | regs | spills | smem B | warps/SM (limit) | "
           "hot-loop global loads / stores per iteration, each pass | instr/col | MUFU/col (ex2) | BAR/col | "
           "B/elem HBM | predicted floors ms: memory / MUFU / issue | bound |",
           "|---|---:|---|---:|---|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ls = r["launches"]
        launches = "; ".join(f"{L['kernel'].strip('_')}({', '.join(str(L['meta'][k]) for k in ('PHASE', 'BLOCK') if k in L['meta'])}, "
                             f"{L['num_warps']})" for L in ls)
        mem = " // ".join(" | ".join(_mem(m) for m in L["loop_memory_ops"]) for L in ls)
        pc = r["per_column"]
        out.append(f"| {r['case']} | {r['V']} | {launches} | {'/'.join(str(L['regs']) for L in ls)} | "
                   f"{', '.join(sorted({_spills(L) for L in ls}))} | {'/'.join(str(L['smem_bytes']) for L in ls)} | "
                   f"{'/'.join(str(L['warps_per_sm']) for L in ls)} ({ls[-1]['limited_by']}) | {mem} | "
                   f"{_f(pc['instructions'])} | {_f(pc['mufu'], 2)} ({_f(pc['ex2'], 2)}) | {_f(pc['bar'], 3)} | "
                   f"{_f(r['hbm_bytes_per_elem'])} | {_ms(r)} | {r['bound']} |")
    return out


def _cuda_tables(rows, facts) -> list:
    out = ["| kernel | regs | spills (ptxas) | local memory | static smem B | passes: hot-loop memory per iteration "
           "(global, and 16-byte shared) | cols/thread/iteration |",
           "|---|---:|---|---|---:|---|---|"]
    for label, k in facts.items():
        if "error" in k:
            out.append(f"| {label} | error: {k['error'][:200]} | | | | | |")
            continue
        mem = " // ".join(f"{p['kind']}: {_mem(p['memory'], ('LDG', 'STG', 'LDS', 'STS'))}" for p in k["passes"])
        spill = f"{k['spill_stores']} B stores, {k['spill_loads']} B loads"
        out.append(f"| {label} | {k['regs']} | {spill} | {k['local_bytes']} B, {k['local_ops']} LDL/STL | "
                   f"{k['static_smem']} | {mem} | {', '.join(_f(p['cols_per_thread'], 0) for p in k['passes'])} |")
    out += ["", "| case | V | plan (cluster, resident, threads, dyn smem) | warps/SM (limit) | passes | "
            "instr/col: upper bound (lower) | MUFU/col (upper bound) | B/elem HBM | predicted floors ms: memory / MUFU / issue | bound |",
            "|---|---:|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        p = r["plan"]
        plan = f"{p['cluster']}, {'yes' if p['resident'] else 'no'}, {p['threads']}, {p['smem']}" if p else \
            f"1, no, {r['threads']}, 0"
        out.append(f"| {r['case']} | {r['V']} | {plan} | {r['warps_per_sm']} ({r['limited_by']}) | "
                   f"{', '.join(r['passes'])} | {_f(r['per_column']['instructions'])} ({_f(r['per_column']['shortest'])}) | "
                   f"{_f(r['per_column']['mufu'], 2)} | {_f(r['hbm_bytes_per_elem'])} | {_ms(r)} | {r['bound']} |")
    return out


def goal_table(rows) -> list:
    """Issue 12's part-2 goal per headline case at V = 32000 and 128256."""
    out = ["| case | V | issue / memory floor (goal <= 0.6) | BAR.SYNC per column in the loops (goal <= 1/256) | met |",
           "|---|---:|---:|---:|---|"]
    for r in rows:
        if not r["headline"] or r["V"] not in (32000, 128256):
            continue
        ratio = r["issue_ms"] / r["memory_ms"]
        bar = r["per_column"]["bar"]
        ok = ratio <= 0.6 and bar <= 1 / 256
        out.append(f"| {r['case']} | {r['V']} | {_f(ratio, 2)} | {_f(bar, 3)} | {'yes' if ok else 'no'} |")
    return out


def markdown(report: dict) -> str:
    env, trows = report["environment"], report["triton"]
    lines = [
        f"# Kernel report: predicted from the compiler ({env['date']})", "",
        "Nothing here ran on a GPU: every figure is **predicted** from the sm_90 binaries that the compilers "
        "produce for the launches the launcher picks, with the H200 constants below. Measurements are "
        "elsewhere (bench/results/gpu-run-*).", "",
        f"- command: `{env['command']}`",
        f"- triton {env['triton']} (target {env['target']}), nvcc: {env['nvcc']}, torch {env['torch']}",
        f"- H200 model: {sass.SMS} SMs, {sass.CLOCK_HZ / 1e9:.2f} GHz, memory floor at "
        f"{sass.HBM_BYTES_S / 1e12:.1f} TB/s, MUFU floor at {sass.MUFU_OPS_S / 1e12:.1f}e12 ops/s, issue floor at "
        f"{sass.ISSUE_PER_CLK_SM} warp-instructions / clock / SM; re-read passes hit L2 when rows in flight x "
        f"the bytes a pass reads per row <= {sass.L2_BUDGET / 1e6:.0f} MB",
        "- cases: bf16 student and teacher, labels with ignore_index, T = 2, no hard-label term unless "
        "named; N = 16384 unless named", "",
        "How to read: *instr/col*, *MUFU/col*, *BAR/col* are SASS instructions one thread issues per row "
        "element it owns: the steady-state loop body of each vocabulary pass (its hot path) divided by the "
        "columns a thread handles per iteration (BLOCK / threads for Triton), summed over passes and "
        "launches; for a row held in registers (one block), the kernel's path divided by V / threads. "
        "*B/elem HBM* is a traffic model: each launch's first pass reads its inputs from HBM, a later pass "
        "re-reads them from HBM unless they fit the L2 budget, stores always go to HBM. Floors: memory = "
        "N V B/elem / 4.3 TB/s; MUFU = N V MUFU/col / 4.2e12; issue = N V instr/col / 32 / (4 x 132 x "
        "1.98e9). *bound*: the largest floor. Occupancy: CTAs per SM from registers (allocated per warp "
        "in 256s), shared memory (the 1 KB per CTA reserve included) and 64 warp slots.", "",
        "## Issue 12 goal (part 2), headline cases (predicted)", "", *goal_table(trows), "",
        "## Triton: headline cases (predicted)", "", *_triton_table([r for r in trows if r["headline"]]), "",
        "## Triton: other launch paths and kernels (predicted)", "", *_triton_table([r for r in trows if not r["headline"]]), "",
    ]
    if report.get("cuda_error"):
        lines += ["## CUDA C++", "", f"not reported: {report['cuda_error']}", ""]
    else:
        lines += ["## CUDA C++ kernels (predicted)", "",
                  "Per-column counts follow each pass loop's longest 16-byte path with every runtime option "
                  "taken (hard labels at T != 1, teacher gradient): an **upper bound** for cases without them "
                  "(in brackets: the shortest 16-byte path, a lower bound); the issue floor uses the upper "
                  "bound. Plans are kd_choose_plan's, emulated for an H200; the HBM bytes follow the plan "
                  "(resident: one read of s and t).", "",
                  *_cuda_tables(report["cuda"], report["cuda_kernels"]), ""]
    problems = report["problems"]
    lines += ["## Spills and local memory", "",
              "none in any reported kernel" if not problems else "\n".join(f"- {p}" for p in problems), ""]
    return "\n".join(lines)

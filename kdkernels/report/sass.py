"""SASS reading for the kernel report: nvdisasm / cuobjdump output -> functions, loops, hot paths,
instruction counts; resource usage; the occupancy and floors they predict.

Attribution of loop instructions (what "per column" means everywhere in the report): the steady
state of a vocabulary pass is one iteration of its innermost loop. Its instructions are counted
along the loop body's hot path (below), and divided by the columns each thread handles per
iteration, then summed over the passes. So "instructions per column" is what one thread issues
per element it owns; a warp issues 1/32 of a warp-instruction per element and thread lane.

Hot path: a loop body is a DAG once its back edge is removed. Triton's loops here have no
internal branches (masks are predicates), so the hot path is the whole body. Where there are
branches (CUDA C++: a vector path and a scalar fallback for unaligned or partial packs, runtime
options such as the hard-label term), the hot path is the path from the loop header to the back
edge with the most 16-byte memory accesses, then the most instructions: the vector path with
every optional branch taken, an upper bound when some options are off.
"""
from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field

# H200 (sm_90) numbers the floors and occupancy use (all "predicted").
SMS = 132
CLOCK_HZ = 1.98e9
ISSUE_PER_CLK_SM = 4          # warp-instructions per clock per SM (4 schedulers)
HBM_BYTES_S = 4.3e12          # device-to-device copy bandwidth (DESIGN.md)
MUFU_OPS_S = 4.2e12           # 16 MUFU ops / clock / SM x 132 x 1.98 GHz
REGS_PER_SM = 65536
MAX_WARPS_SM = 64
MAX_CTAS_SM = 32
SMEM_PER_SM = 233472          # 228 KB; cuobjdump's SHARED already includes the 1 KB per CTA reserve
L2_BUDGET = 40e6              # rows in flight x row-pair bytes below this: the re-read hits L2 (issue 12)

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_FUNC = re.compile(r"^\.text\.(\S+):")


@dataclass
class Instr:
    op: str        # opcode with modifiers, e.g. LDG.E.128
    pred: str      # "" or the guard, e.g. "@!P3"
    text: str      # operands

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Function:
    name: str
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)   # label -> instruction index


def disassemble(nvdisasm: str, cubin: str) -> dict:
    """{function name: Function} of a cubin (nvdisasm -c)."""
    out = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    funcs, fn = {}, None
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            fn = funcs.setdefault(m.group(1), Function(m.group(1)))
            continue
        if fn is None:
            continue
        m = _LABEL.match(line)
        if m:
            fn.labels[m.group(1)] = len(fn.instrs)
            continue
        m = _INSTR.match(line)
        if m:
            fn.instrs.append(Instr(m.group(3), (m.group(2) or "").strip(), m.group(4).strip()))
    return funcs


def resource_usage(cuobjdump: str, cubin: str) -> dict:
    """{function: {REG, STACK, SHARED, LOCAL}} from cuobjdump -res-usage."""
    out = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return res


# ---- control flow -------------------------------------------------------------------------------

def _is_branch(ins: Instr) -> bool:
    return ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "BPT")


def _blocks(fn: Function):
    """(starts, succ): basic blocks as [start, end) instruction ranges and their successors."""
    n = len(fn.instrs)
    lead = {0} | set(fn.labels.values())
    for i, ins in enumerate(fn.instrs):
        if _is_branch(ins) and i + 1 < n:
            lead.add(i + 1)
    starts = sorted(x for x in lead if x < n)
    ends = starts[1:] + [n]
    index = {s: k for k, s in enumerate(starts)}
    succ = []
    for k, (s, e) in enumerate(zip(starts, ends)):
        last = fn.instrs[e - 1]
        out = []
        if last.base in ("BRA", "JMP"):
            t = _TARGET.search(last.text)
            if t and t.group(1) in fn.labels and fn.labels[t.group(1)] in index:
                out.append(index[fn.labels[t.group(1)]])
            if last.pred and k + 1 < len(starts):
                out.append(k + 1)
        elif last.base in ("EXIT", "RET"):
            if last.pred and k + 1 < len(starts):
                out.append(k + 1)
        elif k + 1 < len(starts):
            out.append(k + 1)
        succ.append(out)
    return list(zip(starts, ends)), succ


def wide(ins: Instr) -> bool:
    """A 16-byte global or shared memory access (row data moved in packs)."""
    return ins.base in ("LDG", "STG", "LDS", "STS") and "128" in ins.op.split(".")


@dataclass
class Loop:
    header: int            # block index
    blocks: list           # block indices on the hot path, in order
    instrs: list           # the hot path's instructions
    size_all: int          # every instruction of the loop body (all paths)
    shortest: int          # instructions on the shortest path with as many 16-byte accesses


def innermost_loops(fn: Function) -> list:
    """Innermost loops of fn with their hot paths (see the module docstring), in code order."""
    blocks, succ = _blocks(fn)
    pred = [[] for _ in blocks]
    for a, outs in enumerate(succ):
        for b in outs:
            pred[b].append(a)
    loops = {}
    for a, outs in enumerate(succ):
        for h in outs:
            if h <= a:  # back edge a -> h: natural loop = blocks reaching a without passing h
                body, stack = {h, a}, [a]
                while stack:
                    x = stack.pop()
                    for p in pred[x]:
                        if p not in body and p >= h:
                            body.add(p)
                            stack.append(p)
                loops.setdefault(h, [set(), set()])
                loops[h][0] |= body
                loops[h][1].add(a)
    result = []
    for h, (body, latches) in sorted(loops.items()):
        if any(h2 != h and h2 in body for h2 in loops):
            continue  # contains another loop: not innermost
        result.append(_hot_path(fn, blocks, succ, h, body, latches))
    return result


def _hot_path(fn, blocks, succ, h, body, latches) -> Loop:
    longest = _dag_path(fn, blocks, succ, h, body, latches, 1)
    shortest = _dag_path(fn, blocks, succ, h, body, latches, -1)
    instrs = [ins for b in longest for ins in fn.instrs[blocks[b][0]:blocks[b][1]]]
    size_all = sum(blocks[b][1] - blocks[b][0] for b in body)
    return Loop(h, longest, instrs, size_all, sum(blocks[b][1] - blocks[b][0] for b in shortest))


def _dag_path(fn, blocks, succ, h, body, latches, sign):
    """Blocks of the header-to-latch path with the most 16-byte accesses, then the most
    (sign 1) or fewest (sign -1) instructions (block order is topological without back edges)."""
    order = sorted(body)
    best = {}  # block -> (score, path); score = (16-byte accesses, sign * instructions)
    for b in order:
        s, e = blocks[b]
        own = fn.instrs[s:e]
        w = (sum(map(wide, own)), sign * len(own))
        if b == h:
            best[b] = (w, [b])
            continue
        cands = [best[p] for p in best if b in succ[p] and p < b]
        if not cands:
            continue
        (n0, i0), path = max(cands, key=lambda c: c[0])
        best[b] = ((n0 + w[0], i0 + w[1]), path + [b])
    ends = [best[x] for x in latches if x in best]
    return max(ends, key=lambda c: c[0])[1]


def straight_path(fn: Function) -> list:
    """The hot path of a loop-free function from its entry to an exit (same rule as loops)."""
    blocks, succ = _blocks(fn)
    best = {0: ((sum(map(wide, fn.instrs[blocks[0][0]:blocks[0][1]])), blocks[0][1] - blocks[0][0]), [0])}
    for b in range(1, len(blocks)):
        s, e = blocks[b]
        own = fn.instrs[s:e]
        cands = [best[p] for p in best if b in succ[p] and p < b]
        if cands:
            (n0, i0), path = max(cands, key=lambda c: c[0])
            best[b] = ((n0 + sum(map(wide, own)), i0 + len(own)), path + [b])
    exits = [v for b, v in best.items() if not succ[b] and fn.instrs[blocks[b][1] - 1].base == "EXIT"]
    _, path = max(exits or best.values(), key=lambda c: c[0])
    return [ins for b in path for ins in fn.instrs[blocks[b][0]:blocks[b][1]]]


# ---- counts -------------------------------------------------------------------------------------

def width_bytes(ins: Instr) -> int:
    """Bytes per thread of a memory instruction (LDG.E.128 -> 16, .64 -> 8, .U16 -> 2, plain -> 4)."""
    mods = ins.op.split(".")[1:]
    for m, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return b
    return 4


def mix(instrs) -> dict:
    """Counts of what matters on a path: total, memory ops by width, BAR, MUFU, SHFL, local memory."""
    c = Counter(i.op for i in instrs)
    mem = {op: n for op, n in sorted(c.items()) if op.split(".")[0] in ("LDG", "STG", "LDS", "STS", "LDGSTS")}
    return {
        "instructions": len(instrs),
        "memory": mem,
        "bar": sum(n for op, n in c.items() if op.startswith("BAR.SYNC") or op == "BAR"),
        "mufu": sum(n for op, n in c.items() if op.startswith("MUFU")),
        "ex2": c.get("MUFU.EX2", 0),
        "shfl": sum(n for op, n in c.items() if op.startswith("SHFL")),
        "local": sum(n for op, n in c.items() if op.split(".")[0] in ("LDL", "STL")),
        "load_bytes": sum(width_bytes(i) for i in instrs if i.base in ("LDG", "LDS", "LDGSTS")),
        "global_load_bytes": sum(width_bytes(i) for i in instrs if i.base == "LDG"),
        "store_bytes": sum(width_bytes(i) for i in instrs if i.base == "STG"),
        "calls": sum(n for op, n in c.items() if op.startswith("CALL")),
    }


def local_memory_ops(fn: Function) -> int:
    return sum(1 for i in fn.instrs if i.base in ("LDL", "STL"))


# ---- predictions --------------------------------------------------------------------------------

def occupancy(regs: int, threads: int, smem_per_cta: int) -> dict:
    """CTAs and warps per SM that registers, shared memory and warp slots allow (sm_90 rules:
    registers allocated per warp in units of 256, 64 warps, 32 CTAs, 228 KB per SM)."""
    warps = max(1, -(-threads // 32))
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_warp) // warps
    by_smem = SMEM_PER_SM // max(smem_per_cta, 1024)  # 1 KB per CTA is reserved whatever it uses
    by_warps = MAX_WARPS_SM // warps
    ctas = max(0, min(by_regs, by_smem, by_warps, MAX_CTAS_SM))
    limit = min((by_regs, "registers"), (by_smem, "shared memory"), (by_warps, "warp slots"),
                (MAX_CTAS_SM, "CTA slots"))[1]
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "limited_by": limit}


def floors_ms(elements: int, hbm_bytes_per_elem: float, mufu_per_col: float, instr_per_col: float) -> dict:
    """Predicted lower bounds in ms: memory, MUFU, instruction issue (per-thread counts per column)."""
    issue_rate = ISSUE_PER_CLK_SM * SMS * CLOCK_HZ  # warp-instructions per second
    return {
        "memory_ms": elements * hbm_bytes_per_elem / HBM_BYTES_S * 1e3,
        "mufu_ms": elements * mufu_per_col / MUFU_OPS_S * 1e3,
        "issue_ms": elements * instr_per_col / 32 / issue_rate * 1e3,
    }

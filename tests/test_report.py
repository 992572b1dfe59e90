"""The kernel report (python -m kdkernels report): the JIT key emulation, the SASS reading, and
a quick report whose every kernel must compile for sm_90 without spills or local memory.

Compiled Triton needs TRITON_INTERPRET unset before Triton is imported, which the other test
files set: everything that compiles runs in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdkernels.report import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> dict:
    """Runs `code` (which prints one JSON line last) in a fresh Python without the interpreter."""
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the JIT's key, emulated

_SPECS = r"""
import json, torch
from kdkernels.report import cases as C
from kdkernels.report.triton_specs import specialise, target
out = {}
for V, stride in [(128256, None), (50257, None), (128256, 128256 + 64), (128256, 128256 + 8)]:
    kw = {} if stride is None else {"teacher_stride": stride}
    (launch,) = C.kd_case("kl", V, **kw).launches()
    key, sig, constexprs, attrs, options = specialise(launch, target())
    names = launch.kernel.arg_names
    div = {names[i[0]]: bool(a) for i, a in attrs.items() if names[i[0]] not in constexprs}
    out[f"{V}/{stride}"] = {"div": div, "sig": {n: sig[n] for n in ("s_ptr", "V", "stride_t", "splits")},
                            "const": {names[k[0]]: v for k, v in constexprs.items()
                                      if names[k[0]] in ("splits", "BLOCK", "PHASE")},
                            "warps": options.num_warps, "meta": {k: launch.meta[k] for k in ("BLOCK", "num_warps")}}
print(json.dumps(out))
"""


def test_specialisation_follows_the_jit_rules():
    """ints divisible by 16 carry tt.divisibility, == 1 become constexprs, pointers are typed:
    the key the JIT computes, through the installed Triton's own binder."""
    r = _run(_SPECS)
    even, odd = r["128256/None"], r["50257/None"]
    assert even["sig"]["s_ptr"] == "*bf16" and even["sig"]["V"] == "i32"
    assert even["div"]["V"] and even["div"]["stride_t"] and even["div"]["s_ptr"]
    assert not odd["div"]["V"] and not odd["div"]["stride_t"]
    assert even["sig"]["splits"] == "constexpr" and even["const"]["splits"] == 1  # splits == 1
    assert r["128256/128320"]["div"]["stride_t"]                                  # V + 64: still divisible
    assert not r["128256/128264"]["div"]["stride_t"]                              # V + 8: not by 16
    assert even["const"]["BLOCK"] == even["meta"]["BLOCK"] and even["warps"] == even["meta"]["num_warps"]


def test_report_follows_the_tuning_table(tmp_path):
    """A tuning-table entry for the H200 changes the launch the report compiles (the report is
    built from the launcher's own records)."""
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"entries": [{"device": "NVIDIA H200", "V": 128256, "min_rows": 528,
                                              "block": 2048, "num_warps": 4}]}))
    code = ("import json; from kdkernels.report import cases as C\n"
            "print(json.dumps([{k: L.meta[k] for k in ('BLOCK', 'num_warps')} "
            "for V in (128256, 32000) for L in C.kd_case('kl', V).launches()]))")
    tuned = _run(code, KDKERNELS_TUNING_TABLE=str(table))
    rule = _run(code, KDKERNELS_TUNING_TABLE="0")
    assert tuned[0] == {"BLOCK": 2048, "num_warps": 4} and tuned[1] == rule[1]
    assert rule[0] == {"BLOCK": 4096, "num_warps": 8}


# ---------------------------------------------------------------- SASS reading (no compiler)

def _fn(lines):
    """A Function from nvdisasm-like lines: 'OP operands' or '.L_x_N:' labels."""
    fn = sass.Function("k")
    for text in lines:
        if text.endswith(":"):
            fn.labels[text[:-1]] = len(fn.instrs)
            continue
        pred = ""
        if text.startswith("@"):
            pred, text = text.split(" ", 1)
        op, _, rest = text.partition(" ")
        fn.instrs.append(sass.Instr(op, pred, rest))
    return fn


def test_hot_path_takes_the_vector_branch_and_whole_branch_free_bodies():
    fn = _fn(["MOV R0, RZ", ".L_x_1:", "IADD3 R1, R1, 1", "@P0 BRA `(.L_x_2)",          # aligned?
              "LDG.E.U16 R2, [R4]", "LDG.E.U16 R3, [R4+2]", "LDG.E.U16 R5, [R4+4]", "BRA `(.L_x_3)",
              ".L_x_2:", "LDG.E.128 R8, [R4]", ".L_x_3:", "MUFU.EX2 R9, R9", "FADD R0, R0, R9",
              "BAR.SYNC.DEFER_BLOCKING 0x0", "@!P1 BRA `(.L_x_1)", ".L_x_4:",
              "LDG.E.128 R8, [R6]", "FMUL R8, R8, R8", "STG.E.128 [R6], R8", "@!P2 BRA `(.L_x_4)", "EXIT"])
    loops = sass.innermost_loops(fn)
    assert len(loops) == 2
    hot = sass.mix(loops[0].instrs)
    assert hot["memory"] == {"LDG.E.128": 1} and hot["mufu"] == 1 and hot["bar"] == 1
    assert hot["instructions"] == 7 and loops[0].size_all == 11
    second = sass.mix(loops[1].instrs)
    assert second["instructions"] == 4 == loops[1].size_all and second["store_bytes"] == 16


def test_occupancy_and_floors():
    # 64 registers x 256 threads: 2048 registers a warp -> 32 warps = 4 CTAs
    assert sass.occupancy(64, 256, 1056) == {"ctas_per_sm": 4, "warps_per_sm": 32, "limited_by": "registers"}
    # 116 registers round up to 120 per thread: 3840 per warp -> 17 warps -> 2 CTAs of 8 warps
    assert sass.occupancy(116, 256, 1600 + 64128)["warps_per_sm"] == 16
    # shared memory bound: 131 KB per CTA
    assert sass.occupancy(32, 512, 1600 + 131072) == {"ctas_per_sm": 1, "warps_per_sm": 16,
                                                      "limited_by": "shared memory"}
    f = sass.floors_ms(16384 * 128256, 6.0, 2.0, 32.0)
    assert f["memory_ms"] == pytest.approx(16384 * 128256 * 6 / 4.3e12 * 1e3)
    assert f["mufu_ms"] == pytest.approx(16384 * 128256 * 2 / 4.2e12 * 1e3)
    assert f["issue_ms"] == pytest.approx(16384 * 128256 * 32 / 32 / (4 * 132 * 1.98e9) * 1e3)


# ---------------------------------------------------------------- the quick report

@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kdkernels", "report", "--quick", "--check", "--out", str(out)],
                       env=e, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (js,) = [f for f in os.listdir(out) if f.endswith(".json")]
    with open(out / js) as f:
        report = json.load(f)
    assert (out / js.replace(".json", ".md")).read_text().startswith("# Kernel report: predicted")
    return report


def test_quick_report_triton_kernels_have_no_spills(quick_report):
    rows = quick_report["triton"]
    assert {r["family"] for r in rows} == {"kd", "topk", "softmax_fwd"}
    for r in rows:
        for L in r["launches"]:
            assert L["local_bytes"] == 0 and L["stack_bytes"] == 0 and L["local_ops"] == 0, (r["case"], L)
            assert 0 < L["regs"] <= 255 and L["warps_per_sm"] > 0
        assert r["per_column"]["instructions"] > 0 and r["memory_ms"] > 0
    assert quick_report["problems"] == []


def test_quick_report_reads_the_hot_loops(quick_report):
    """What the SASS of today's kernels must show for the numbers to mean anything (issue 12 part 2):
    the streaming kl kernel has two passes of 16-byte loads at V = 128256, and so has jsd + teacher
    gradient at V = 50257 (three passes, its rows aligned by a head of < 8 columns); no barrier
    in any streaming loop (per-lane statistics, one reduction per pass)."""
    by = {(r["case"], r["V"]): r for r in quick_report["triton"]}
    (kl,) = by[("kl", 128256)]["launches"]
    assert kl["passes"] >= 2 and all("LDG.E.128" in m for m in kl["loop_memory_ops"])
    (odd,) = by[("jsd + teacher grad", 50257)]["launches"]
    assert odd["passes"] >= 3 and all("LDG.E.128" in m and "LDG.E.U16" not in m for m in odd["loop_memory_ops"])
    assert by[("kl", 128256)]["per_column"]["bar"] == 0 and by[("jsd + teacher grad", 50257)]["per_column"]["bar"] == 0
    assert by[("kl", 8192)]["launches"][0]["meta"]["ONE_BLOCK"]


needs_nvcc = pytest.mark.skipif(not any(os.access(os.path.join(d, "nvcc"), os.X_OK)
                                        for d in os.environ.get("PATH", "").split(os.pathsep) +
                                        [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]),
                                reason="nvcc not installed")


@needs_nvcc
def test_quick_report_cuda_kernels_have_no_spills(quick_report):
    assert "cuda_error" not in quick_report, quick_report.get("cuda_error")
    kernels = quick_report["cuda_kernels"]
    assert any(k.startswith("kd_fwd_bwd_kernel") for k in kernels) and any(k.startswith("softmax") for k in kernels)
    for label, k in kernels.items():
        assert "error" not in k, k
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["local_bytes"] == 0 and k["local_ops"] == 0, label
        assert k["passes"], label
    assert quick_report["cuda"]


@needs_nvcc
def test_quick_report_cuda_aligned_stores_are_16_bytes(quick_report):
    """On the aligned path every output pack is one STG.E.128 (csrc/kd_common.cuh store_pack):
    nvcc had split a plain store of the pack into eight STG.E.U16 for the fused kernel's student
    gradient and the softmax output."""
    for label, k in quick_report["cuda_kernels"].items():
        stores = [p["memory"] for p in k["passes"] if any(op.startswith("STG") for op in p["memory"])]
        assert stores, label
        for m in stores:
            assert {op for op in m if op.startswith("STG")} == {"STG.E.128"}, (label, m)

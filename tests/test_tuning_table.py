"""The tuning table (kdkernels/backends/tuning_table.json) that launch_config reads: an entry
replaces the streaming block and warps for its device, V and row regime; without one the block
rule stands; a tuned launch still matches the float64 reference (interpreter)."""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kdkernels.backends import cuda_backend, triton_backend as TB, tuned  # noqa: E402

from conftest import assert_matches_reference, make_inputs  # noqa: E402

H200 = "NVIDIA H200"
CPU = torch.device("cpu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Writes a table with the given entries and points launch_config at it."""
    def write(entries):
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"entries": entries}))
        monkeypatch.setenv("KDKERNELS_TUNING_TABLE", str(path))
        tuned._CACHE.pop(str(path), None)
        return path
    return write


def _rule(N, V):
    with TB.tuning(sms=132, no_table=True):
        return TB.launch_config(N, V, CPU)


def test_committed_table_is_well_formed():
    with open(tuned.TABLE) as f:
        data = json.load(f)
    for e in data["entries"]:
        assert {"backend", "device", "V", "min_rows"} <= set(e), e
        if e["backend"] == "triton":
            assert e["block"] & (e["block"] - 1) == 0 and e["num_warps"] in (1, 2, 4, 8, 16, 32), e
        else:
            assert e["backend"] == "cuda" and e["path"] in ("auto", "nocluster", "twopass"), e


def test_entry_replaces_block_and_warps(table):
    table([{"backend": "triton", "device": H200, "V": 128256, "min_rows": 528, "block": 2048, "num_warps": 4},
           {"backend": "cuda", "device": H200, "V": 32000, "min_rows": 528, "path": "twopass"}])
    with TB.tuning(sms=132, device_name=H200):
        cfg = TB.launch_config(16384, 128256, CPU)
        assert (cfg.block, cfg.num_warps, cfg.splits, cfg.span, cfg.one_block) == (2048, 4, 1, 128256, False)
        # another V, another device, fewer rows than the entry was tuned for: the rule
        assert TB.launch_config(16384, 32000, CPU) == _rule(16384, 32000)
        assert TB.launch_config(64, 128256, CPU) == _rule(64, 128256)
    with TB.tuning(sms=132, device_name="NVIDIA H100 80GB HBM3"):
        assert TB.launch_config(16384, 128256, CPU) == _rule(16384, 128256)


def test_no_entry_keeps_the_rule(table):
    table([])
    with TB.tuning(sms=132, device_name=H200):
        for N, V in [(16384, 128256), (16384, 50257), (8, 262144), (3, 7)]:
            assert TB.launch_config(N, V, CPU) == _rule(N, V)
    rule = _rule(16384, 128256)
    assert (rule.block, rule.num_warps) == (TB.LOOP_BLOCK, min(16, max(4, TB.LOOP_BLOCK // 512)))


def test_table_off_and_explicit_overrides_win(table, monkeypatch):
    table([{"backend": "triton", "device": H200, "V": 128256, "min_rows": 1, "block": 2048, "num_warps": 4}])
    with TB.tuning(sms=132, device_name=H200, loop_block=1024):  # a benchmark's forced block
        assert TB.launch_config(16384, 128256, CPU).block == 1024
    monkeypatch.setenv("KDKERNELS_TUNING_TABLE", "0")
    with TB.tuning(sms=132, device_name=H200):
        assert TB.launch_config(16384, 128256, CPU) == _rule(16384, 128256)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_tuned_launch_matches_reference(table, divergence):
    """A table entry's block and warps reach the kernel and give the reference's numbers
    (tiny sizes: one_block_max lowered so that V = 300 streams in 64-column blocks)."""
    V = 300
    table([{"backend": "triton", "device": H200, "V": V, "min_rows": 1, "block": 64, "num_warps": 2}])
    s, t, y = make_inputs((6, V), torch.float32, labels=True, generator=torch.Generator().manual_seed(3))
    if DEVICE == "cuda":
        s, t, y = s.cuda(), t.cuda(), y.cuda()
    with TB.tuning(sms=1, device_name=H200, one_block_max=128):
        cfg = TB.launch_config(6, V, CPU)
        assert (cfg.block, cfg.num_warps, cfg.one_block) == (64, 2, False)
        launches, _ = TB.kd_launches(s, t, y, torch.empty_like(s), torch.empty(0), teacher_is_probs=False,
                                     temperature=2.0, divergence=0, beta=0.5, soft_scale=4.0, hard_weight=0.0,
                                     ignore_index=-100, teacher_grad=False)
        assert [(L.meta["BLOCK"], L.meta["num_warps"]) for L in launches] == [(64, 2)]
        assert_matches_reference(s, t, y, backend="triton", divergence=divergence, temperature=2.0,
                                 hard_weight=0.5)


def test_cuda_path_from_the_table(table, monkeypatch):
    """The CUDA backend's path (largest cluster) comes from a table entry when
    KDKERNELS_CUDA_PATH is unset; the variable still wins; no entry: auto (clusters of 8)."""
    table([{"backend": "cuda", "device": H200, "V": 32000, "min_rows": 528, "path": "twopass"},
           {"backend": "triton", "device": H200, "V": 128256, "min_rows": 1, "block": 2048, "num_warps": 4}])
    monkeypatch.delenv("KDKERNELS_CUDA_PATH", raising=False)
    assert cuda_backend.max_cluster_for(H200, 16384, 32000) == 0
    assert cuda_backend.max_cluster_for(H200, 100, 32000) == 8          # fewer rows than tuned for
    assert cuda_backend.max_cluster_for(H200, 16384, 128256) == 8       # a Triton entry only
    monkeypatch.setenv("KDKERNELS_CUDA_PATH", "nocluster")
    assert cuda_backend.max_cluster_for(H200, 16384, 32000) == 1


def test_tune_winner_needs_a_margin_and_a_matching_loss():
    """bench/gpu_run.sh's tune stage writes an entry only for a configuration that beats the
    rule by more than the margin on average over the divergences, with the rule's loss."""
    from kdkernels.bench.tune import _winner
    rule, other, worse = (4096, 8), (2048, 4), (8192, 16)
    assert _winner({rule: [10.0, 20.0], other: [9.0, 18.0], worse: [11.0, 30.0]}, rule, 0.03) == other
    assert _winner({rule: [10.0, 20.0], other: [9.9, 19.8]}, rule, 0.03) is None       # within the margin
    assert _winner({rule: [10.0, 20.0], other: [5.0, float("inf")]}, rule, 0.03) is None  # wrong loss once
    assert _winner({rule: [float("inf")], other: [1.0]}, rule, 0.03) is None            # the rule itself failed

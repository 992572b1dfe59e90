"""The command line: `python -m kdkernels info | check | bench` on CPU, at tiny sizes."""
import csv
import json
import subprocess
import sys

import pytest

from kdkernels import cli
from kdkernels.bench import main as bench_main


def test_info_runs_and_lists_every_backend():
    r = subprocess.run([sys.executable, "-m", "kdkernels", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("versions", "torch", "devices", "backends", "cuda extension"):
        assert word in r.stdout
    lines = [line.split() for line in r.stdout.splitlines()]
    for backend in ("torch", "triton", "cuda"):
        assert any(len(w) > 1 and w[0] == backend and w[1] == "cpu" for w in lines), backend
    assert any(w[:3] == ["torch", "cpu", "runs"] for w in lines)


def test_check_passes_on_cpu_and_prints_the_table(capsys):
    assert cli.main_check(["--backend", "torch", "--seed", "3", "--N", "6", "--V", "33"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    from kdkernels.options import DIVERGENCE_TABLE
    for d in DIVERGENCE_TABLE:
        assert f" {d.name} " in out
    for teacher in ("logits", "probs", "ensemble", "topk"):
        assert f" {teacher} " in out
    # every divergence x 4 teacher forms (a top-k teacher has none of those infinite off its support) x 4 dtypes
    n = 4 * sum(4 - (not d.finite_off_support) for d in DIVERGENCE_TABLE)
    assert f"{n}/{n} cases passed" in out


def test_check_fails_with_exit_code_1(monkeypatch, capsys):
    monkeypatch.setitem(cli.TOLERANCES, cli.torch.float32, (0.0, 0.0))
    rc = cli.main_check(["--backend", "torch", "--seed", "3", "--N", "6", "--V", "33", "--dtype", "float32",
                         "--divergence", "kl"])
    assert rc == 1 and "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("inprocess", [True, False], ids=["inprocess", "worker-processes"])
def test_bench_tiny_writes_valid_json_csv_md(tmp_path, capsys, inprocess):
    argv = ["--device", "cpu", "--N", "4", "--V", "300", "--backends", "torch", "--peers", "eager",
            "--runs", "2", "--out", str(tmp_path), "--name", "res"] + (["--inprocess"] if inprocess else [])
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "kd:torch" in out and "eager" in out
    assert f"wrote {tmp_path / 'res.json'}, {tmp_path / 'res.csv'}, {tmp_path / 'res.md'}" in out
    data = json.loads((tmp_path / "res.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["versions"]["torch"]
    rows = data["results"]
    assert [r["candidate"] for r in rows] == ["kd:torch", "eager"]
    for r in rows:
        assert r["status"] == "ok" and r["runs"] == 2 and r["full_ms"] > 0
        assert r["grad_err"] < 1e-5 and r["loss_err"] < 1e-5
    assert rows[1]["speedup"] == 1.0
    with open(tmp_path / "res.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and table[0]["candidate"] == "kd:torch" and float(table[0]["full_ms"]) > 0
    md = (tmp_path / "res.md").read_text()
    assert md.startswith("# kdkernels bench") and "| kd:torch |" in md


def test_bench_reports_an_unknown_peer_as_skipped(tmp_path, capsys):
    assert bench_main(["--device", "cpu", "--N", "2", "--V", "50", "--backends", "none", "--peers", "eager",
                       "nosuchpeer", "--runs", "1", "--inprocess", "--out", str(tmp_path)]) == 0
    assert "skipped nosuchpeer" in capsys.readouterr().out

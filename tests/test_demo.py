"""`python -m kdkernels demo --quick`: the outputs' structure and validity, not the claims.

The claims of knowledge distillation are measured by the demo and reported either way; a test
that asserted them would be a flaky test of a training run. What is checked here is that
every number the demo reports is what it says it is: probabilities sum to 1 and lie in
[0, 1], accuracies lie in [0, 1], entropies lie in [0, log 10].
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from kdkernels import demo  # noqa: E402

LOG10 = math.log(10)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One in-process quick run through the CLI entry point, with --out."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    rc = demo.main(["--quick", "--out", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"
    with open(out / "demo.json") as f:
        return json.load(f), out


def _is_prob(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_structure(quick):
    r, _ = quick
    cfg = r["config"]
    assert cfg["quick"] is True
    for key in ("config", "backend", "threads", "n_train", "n_test", "teacher", "examples", "entropy",
                "students", "tables", "summary", "seconds"):
        assert key in r, key
    assert r["backend"] in ("torch", "triton", "cuda")
    assert r["n_train"] + r["n_test"] == 1797
    assert set(r["students"]) == {str(h) for h in cfg["sizes"]}
    assert set(r["tables"]) == {"kd", "kd+hard", "ens-kd"}
    assert set(r["examples"]) == {"3", "7"}
    assert len(r["summary"]["lines"]) == len(r["summary"]["verdicts"]) == 6
    for v in r["summary"]["verdicts"].values():
        assert v in ("reproduced", "partly reproduced", "NOT reproduced")


def test_teacher_accuracies(quick):
    r, _ = quick
    t = r["teacher"]
    assert _is_prob(t["single_test_accuracy"]) and _is_prob(t["ensemble_test_accuracy"])
    assert len(t["member_test_accuracy"]) == r["config"]["ensemble"]
    assert all(_is_prob(a) for a in t["member_test_accuracy"])
    assert t["single_test_accuracy"] == t["member_test_accuracy"][0]


def test_examples_are_distributions(quick):
    r, _ = quick
    for other, ex in r["examples"].items():
        if ex is None:  # no "2" had this class as its teacher's top other class: reported, allowed
            continue
        assert ex["label"] == 2 and ex["like"] == int(other)
        assert ex["split"] in ("train", "test")
        assert 0 <= ex["index"] < 1797
        assert len(ex["image"]) == 8 and all(len(row) == 8 for row in ex["image"])
        assert set(ex["by_temperature"]) == {format(T, "g") for T in r["config"]["example_temperatures"]}
        for row in ex["by_temperature"].values():
            p = row["probs"]
            assert len(p) == 10 and all(_is_prob(v) for v in p)
            assert math.isclose(sum(p), 1.0, abs_tol=1e-5)
            top = row["top"]
            assert top[0][0] == max(range(10), key=lambda k: p[k])
            assert all(math.isclose(v, p[k]) for k, v in top)
        # the chosen "2" has `other` as its teacher's most likely class besides 2
        p1 = ex["by_temperature"]["1"]["probs"]
        assert max((k for k in range(10) if k != 2), key=lambda k: p1[k]) == int(other)


def test_entropies(quick):
    r, _ = quick
    Ts = [row["T"] for row in r["entropy"]]
    assert Ts == sorted(Ts) and set(r["config"]["temperatures"]) <= set(Ts)
    for row in r["entropy"]:
        for who in ("teacher", "ensemble"):
            e = row[who]
            assert 0.0 <= e["entropy"] <= LOG10 + 1e-6
            assert _is_prob(e["non_target_mass"]) and _is_prob(e["max_prob"])
            assert e["max_prob"] >= 0.1 - 1e-6  # the largest of 10 probabilities


def test_student_accuracies(quick):
    r, _ = quick
    cfg = r["config"]
    keys = {"hard"} | {f"{k}@{T:g}" for k in ("kd", "kd+hard", "ens-kd") for T in cfg["temperatures"]}
    for h, res in r["students"].items():
        assert set(res) == keys
        for accs in res.values():
            assert len(accs) == cfg["seeds"] and all(_is_prob(a) for a in accs)
    for rows in r["tables"].values():
        assert [row["hidden"] for row in rows] == list(cfg["sizes"])
        for row in rows:
            cells = [row["hard"], *row["by_T"].values()]
            assert set(row["by_T"]) == {format(T, "g") for T in cfg["temperatures"]}
            for mean, std in cells:
                assert _is_prob(mean) and 0.0 <= std <= 0.5
            assert row["best_T"] in cfg["temperatures"]
            assert row["by_T"][format(row["best_T"], "g")][0] == max(m for m, _ in row["by_T"].values())
            assert 0 <= row["best_beats_hard_seeds"] <= row["seeds"] == cfg["seeds"]


def test_plot_written(quick):
    _, out = quick
    if _has_matplotlib():
        png = out / "demo.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(quick, tmp_path, monkeypatch):
    r, _ = quick
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    msg = demo.plot(r, str(tmp_path / "x.png"))
    assert msg and "matplotlib" in msg
    assert not (tmp_path / "x.png").exists()


def test_cli_help_and_bad_args(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0"])


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401 (presence only)
    except ImportError:
        return False
    return True


def test_student_training_reports_progress():
    """The student phase is most of the demo's run: it says how far it is, every tenth of the epochs."""
    cfg = demo.Config(**{**demo.QUICK, "seeds": 1, "student_epochs": 20}, quick=True)
    data = demo.load_data(cfg)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, cfg.n_student, 10, generator=g)
    calls = []
    acc = demo.train_students(cfg, data, [("hard", 0.0), ("kd", 2.0)], t, torch.softmax(t, -1),
                              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(e, 20) for e in range(2, 21, 2)]
    assert acc.shape == (2, 1, len(cfg.sizes))


def test_run_prints_progress_before_the_results():
    cfg = demo.Config(**{**demo.QUICK, "seeds": 1, "student_epochs": 5, "teacher_epochs": 5}, quick=True)
    lines = []
    demo.run(cfg, log=lines.append)
    epochs = [i for i, line in enumerate(lines) if "students: epoch" in line]
    trained = next(i for i, line in enumerate(lines) if line.strip().startswith("trained "))
    assert [lines[i].split("epoch ")[1].split(",")[0] for i in epochs] == [f"{e}/5" for e in range(1, 6)]
    assert epochs[-1] < trained and "to go" in lines[epochs[0]] and "to go" not in lines[epochs[-1]]

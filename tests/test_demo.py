"""`ltk demo --quick` end to end (slow), and the CLI's plumbing (fast)."""
import json
import os
import subprocess
import sys
import time

import pytest

from ltkernels.models import benchmarking
from ltkernels.models.cli import main as ltk
from ltkernels.models.engine.demo import COLUMNS, METHODS, format_table, mask_metrics


def test_bench_arguments_are_forwarded(monkeypatch):
    seen = []
    monkeypatch.setattr(benchmarking, "main", lambda argv: seen.append(argv) or 0)
    assert ltk(["bench", "--quick", "-k", "nms"]) == 0
    assert seen == [["--quick", "-k", "nms"]]


def test_format_table_marks_undefined_metrics():
    m = {k: 0.25 for k in COLUMNS}
    table = format_table({"softmax": m, "bags": {**m, "AP4": -1.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["method", *COLUMNS]
    assert lines[2].split() == ["softmax"] + ["25.0"] * len(COLUMNS)
    assert lines[3].split()[-1] == "-"


def test_mask_table_reads_the_mask_metrics_of_the_runs_that_have_them():
    box = {k: 0.25 for k in COLUMNS}
    runs = {"softmax": {**box, **{f"mask_{k}": 0.5 for k in COLUMNS}}, "focal": box}
    lines = format_table(runs, prefix="mask_").splitlines()
    assert lines[0].split() == ["mask_method", *COLUMNS]
    assert len(lines) == 3 and lines[2].split() == ["softmax"] + ["50.0"] * len(COLUMNS)
    assert mask_metrics(runs) == {"softmax": {k: 0.5 for k in COLUMNS}}


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "ltkernels.models.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout and "train" in proc.stdout


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    t0 = time.time()
    assert ltk(["demo", "--quick", "--out", out]) == 0
    elapsed = time.time() - t0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "metrics.json")) as f:
        summary = json.load(f)
    names = [name for name, _, _ in METHODS]
    assert list(summary["runs"]) == names
    for name in names:
        m = summary["runs"][name]["metrics"]
        for k in ("AP", "APr", "APc", "APf", "AP1", "AP2", "AP3"):
            assert -1.0 <= m[k] <= 1.0
        assert m["APf"] >= 0.0  # the validation split has every class
        assert name in printed
        assert os.path.exists(os.path.join(out, name, "checkpoint.pt"))
    assert summary["runs"]["bags"]["base"] == summary["runs"]["simcal"]["base"] == "softmax"
    # the two-stage runs are Mask R-CNNs: mask metrics beside the box metrics, a mask table and plot
    for name in ("softmax", "bags", "simcal"):
        m = summary["runs"][name]["metrics"]
        for k in ("mask_AP", "mask_APr", "mask_APc", "mask_APf"):
            assert -1.0 <= m[k] <= 1.0
        assert m["mask_APf"] >= 0.0 and summary["runs"][name]["config"]["model"]["mask_head"]
    assert "mask_AP" not in summary["runs"]["focal"]["metrics"]
    assert [line.split()[0] for line in summary["mask_table"].splitlines()[2:]] == ["softmax", "bags", "simcal"]
    assert "mask AP" in printed
    for png in ("ap_by_bin.png", "mask_ap_by_bin.png", "ap_vs_instances_softmax.png", "ap_vs_instances_bags.png"):
        assert os.path.getsize(os.path.join(out, png)) > 0
    assert "APr" in printed and summary["total_time_s"] <= elapsed + 1
    # a second run reuses the synthetic data
    assert os.path.exists(os.path.join(out, "data", "demo_data.json"))

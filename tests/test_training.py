"""The training engine: warm-up / step schedule, exact resume (N straight == N/2 + resume + N/2, bitwise on CPU,
EFL buffers included), the CLI, and a 2-process torchrun run on CPU (gloo) whose EFL buffers agree across ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ltkernels.models.cli import main as ltk
from ltkernels.models.configs import get_config, merge
from ltkernels.models.data.synthetic import write_synthetic_lvis
from ltkernels.models.engine.checkpoint import load_checkpoint
from ltkernels.models.engine.trainer import lr_factor, train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_lvis(str(tmp_path_factory.mktemp("synth")), num_classes=6, num_train_images=16,
                                num_val_images=6, image_size=(64, 64), seed=1)


def tiny_cfg(name, max_iter, warmup_iters=3, **train_kw):
    """A named config shrunk to the tiny set: 64-px images, batches of 4, steps at half the schedule."""
    return merge(get_config(name), {"data": {"min_size": 64, "max_size": 64},
                                    "solver": {"max_iter": max_iter, "batch_size": 4, "warmup_iters": warmup_iters,
                                               "steps": [0.5]},
                                    "train": {"eval": False, **train_kw}})


def test_lr_schedule_warmup_then_steps():
    f = lr_factor({"max_iter": 100, "warmup_iters": 10, "warmup_factor": 0.001, "steps": [0.6, 80], "gamma": 0.1})
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert f(10) == 1.0 and f(59) == 1.0
    assert f(60) == pytest.approx(0.1) and f(79) == pytest.approx(0.1)
    assert f(80) == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["one_stage_efl", "two_stage_softmax"])
def test_resume_is_exact(data, tmp_path, name):
    n = 6  # 16 images / batch 4 = 4 batches per epoch: resume mid-epoch, then cross an epoch boundary
    a = train(tiny_cfg(name, n, ckpt_every=n // 2), data["train_ann"], data["image_root"], str(tmp_path / "a"),
              progress=False)
    mid = tmp_path / "a" / f"checkpoint_{n // 2:07d}.pt"
    ck = torch.load(str(mid), weights_only=True)  # plain types only: loads without unpickling code
    assert ck["iteration"] == n // 2 and ck["sampler"] == {"epoch": 0, "index": 12}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "meta"} <= set(ck)
    b = train(tiny_cfg(name, n, ckpt_every=n // 2), data["train_ann"], data["image_root"], str(tmp_path / "b"),
              resume=str(mid), progress=False)
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"][n // 2:]]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    if name == "one_stage_efl":
        efl = b["model"].cls_loss_fn
        assert (efl.pos_grad > 0).any() and torch.equal(efl.pos_neg, a["model"].cls_loss_fn.pos_neg)
    # a different seed gives different weights (the comparison above can fail)
    c = train(tiny_cfg(name, 2, seed=1), data["train_ann"], data["image_root"], str(tmp_path / "c"),
              progress=False)
    d = train(tiny_cfg(name, 2, seed=0), data["train_ann"], data["image_root"], str(tmp_path / "d"),
              progress=False)
    assert any(not torch.equal(v, d["model"].state_dict()[k]) for k, v in c["model"].state_dict().items())


def test_cli_train_then_eval(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert ltk(["train", "--config", "one_stage_focal", "--ann", data["train_ann"], "--images", data["image_root"],
                "--val-ann", data["val_ann"], "--out", out, "--max-iter", "3", "--batch-size", "4",
                "--set", "data.min_size=64", "--set", "data.max_size=64"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint:" in printed and "APr" in printed
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["config"]["solver"]["max_iter"] == 3 and ck["config"]["data"]["min_size"] == 64
    assert ltk(["eval", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--ann", data["val_ann"],
                "--images", data["image_root"], "--out", str(tmp_path / "eval")]) == 0
    assert "APr" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "eval" / "metrics.json")
    assert ltk(["eval", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--ann", data["val_ann"],
                "--images", data["image_root"], "--out", str(tmp_path / "fast"), "--eval-backend",
                "faster-coco-eval"]) == 0
    official, fast = (json.load(open(tmp_path / d / "metrics.json")) for d in ("eval", "fast"))
    assert official["AP"] == pytest.approx(fast["AP"], abs=1e-12)
    assert official["APr"] == pytest.approx(fast["APr"], abs=1e-12)


def test_cli_lists_configs(capsys):
    assert ltk(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("two_stage_softmax", "two_stage_bags", "two_stage_simcal", "one_stage_focal", "one_stage_efl",
                 "lvis_v1_two_stage_bags", "lvis_v0.5_one_stage_efl"):
        assert name in out


@pytest.mark.distributed
def test_torchrun_two_processes_gloo(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dist_train_worker.py"), data["train_ann"], data["image_root"], str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]  # every rank's traceback
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2
    for k in ("pos_grad", "neg_grad", "pos_neg"):
        assert torch.equal(r0[k], r1[k]), k
    assert (r0["pos_grad"] > 0).any()
    # DDP kept the parameters identical (BatchNorm running stats are per rank), each rank saw its own data
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert r0["first_images"] != r1["first_images"]
    assert os.path.exists(out / "checkpoint.pt")


def test_config_files_and_overrides(tmp_path):
    from ltkernels.models.configs import set_value

    path = tmp_path / "my.json"
    path.write_text('{"base": "one_stage_efl", "model": {"efl_scale": 4.0}, "solver": {"max_iter": 7}}')
    cfg = get_config(str(path))
    assert cfg["model"]["efl_scale"] == 4.0 and cfg["model"]["type"] == "one_stage"
    assert cfg["solver"]["max_iter"] == 7 and cfg["solver"]["lr"] == get_config("one_stage_efl")["solver"]["lr"]
    set_value(cfg, "solver.steps", "[100, 200]")
    set_value(cfg, "model.backbone", "resnet50")
    assert cfg["solver"]["steps"] == [100, 200] and cfg["model"]["backbone"] == "resnet50"
    with pytest.raises(KeyError):
        get_config("no_such_config")
    assert get_config("lvis_v1_two_stage_softmax")["model"]["backbone"] == "resnet50"

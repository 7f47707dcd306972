"""The training engine on the failures of a long run: a run killed mid-save and resumed without a path gives
bitwise the uninterrupted run's weights, metrics and one continuous log; concurrent saves; the run folder
(writable, refused or resumed, config.json, train.log, metrics.jsonl, TensorBoard); evaluation during training
and the best checkpoint; user errors of the CLI end in one line and exit status 2."""
import json
import os
import threading

import pytest
import torch
from test_training import data  # noqa: F401 (the training tests' tiny synthetic set)
from test_training import tiny_cfg as training_cfg

from ltkernels.models.cli import main as ltk
from ltkernels.models.configs import ConfigError, get_config, set_value
from ltkernels.models.engine import checkpoint as ck
from ltkernels.models.engine import trainer
from ltkernels.models.engine.run import RunFolderError, read_jsonl
from ltkernels.models.engine.trainer import train


def tiny_cfg(name, max_iter, **train_kw):
    return training_cfg(name, max_iter, warmup_iters=2, **{"log_every": 1, **train_kw})


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def test_killed_mid_save_then_resume_without_path_is_exact(data, tmp_path, monkeypatch):
    n = 6
    cfg = tiny_cfg("one_stage_efl", n, ckpt_every=2)
    full = train(cfg, data["train_ann"], data["image_root"], str(tmp_path / "full"), progress=False)
    out = tmp_path / "killed"
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **kw):  # the second periodic save (iteration 4) dies half-way through writing
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise Killed()
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        train(cfg, data["train_ann"], data["image_root"], str(out), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "last_checkpoint").read_text().strip() == "checkpoint_0000002.pt"
    assert not (out / "checkpoint_0000004.pt").exists()
    assert len(read_jsonl(str(out / "metrics.jsonl"))) == 4  # iterations 3-4 ran after the last checkpoint
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(cfg, data["train_ann"], data["image_root"], str(out), progress=False)
    res = train(cfg, data["train_ann"], data["image_root"], str(out), resume="auto", progress=False)
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, res["model"].state_dict()[k]), k
    a = [r for r in read_jsonl(str(tmp_path / "full" / "metrics.jsonl")) if r["type"] == "train"]
    b = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["type"] == "train"]
    assert [r["iter"] for r in b] == list(range(1, n + 1))  # one continuous history, no repeated iterations
    for key in ("loss", "lr", "loss_cls", "efl_pos_neg_mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    log = json.load(open(out / "train_log.json"))
    assert [h["loss"] for h in log["history"]] == [r["loss"] for r in a]
    text = (out / "train.log").read_text()
    assert "resumed from" in text and f"iter {n}/{n}" in text and "iter 1/6" in text
    leftovers = [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert leftovers == []


def test_run_folder_records(data, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg("two_stage_softmax", 3, ckpt_every=2), data["train_ann"], data["image_root"], str(out),
          progress=False)
    saved = json.load(open(out / "config.json"))
    assert saved["solver"]["max_iter"] == 3 and saved["train"]["ckpt_every"] == 2
    recs = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["iter"] for r in recs] == [1, 2, 3]
    for key in ("loss", "lr", "time", "data_time", "peak_mem_mb", "loss_cls"):
        assert all(isinstance(r[key], float) for r in recs), key
    assert sorted(os.listdir(out / "tb")) and any(f.startswith("events.") for f in os.listdir(out / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tb"))
    ev.Reload()
    assert [s.step for s in ev.Scalars("train/loss")] == [1, 2, 3]
    assert (out / "last_checkpoint").read_text().strip() == "checkpoint.pt"
    assert (out / "checkpoint_0000002.pt").exists()
    assert "iter 3/3" in (out / "train.log").read_text()
    # --overwrite starts again; the old run's checkpoints go
    train(tiny_cfg("two_stage_softmax", 1), data["train_ann"], data["image_root"], str(out), progress=False,
          overwrite=True)
    assert not (out / "checkpoint_0000002.pt").exists() and len(read_jsonl(str(out / "metrics.jsonl"))) == 1


def test_eval_every_keeps_the_best_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg("one_stage_focal", 4, eval_every=2)
    cfg["train"]["eval"] = True
    res = train(cfg, data["train_ann"], data["image_root"], str(out), val_ann=data["val_ann"], progress=False)
    evals = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [2, 4] and all("APr" in r for r in evals)
    best = max(evals, key=lambda r: r["AP"])
    saved = ck.load_checkpoint(str(out / "model_best.pt"))
    assert saved["best"] == {"AP": best["AP"], "iteration": best["iter"]}
    assert saved["iteration"] == best["iter"]
    assert res["metrics"]["AP"] == evals[-1]["AP"]


def test_concurrent_saves_to_one_path(tmp_path):
    path = str(tmp_path / "ck.pt")
    errors = []

    def worker(i):
        try:
            for j in range(6):
                ck.save_checkpoint(path, {"w": torch.full((20000,), float(i)), "j": j})
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = ck.load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((20000,), state["w"][0].item()))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_ranks_preparing_one_folder_at_once(tmp_path, monkeypatch):
    """Under torchrun every rank probes the folder while rank 0 sweeps stale temporaries: each of the two
    interleavings (rank 0 sweeps rank 1's live probe; rank 1 removes its probe after rank 0 listed it) passes."""
    from ltkernels.models.engine import run

    out = str(tmp_path / "run")
    os.makedirs(out)
    mkstemp = run.tempfile.mkstemp

    def probe_then_sweep(*args, **kw):  # rank 0 sweeps between rank 1's probe and its removal
        fd, path = mkstemp(*args, **kw)
        run.remove_stale_temporaries(out)
        return fd, path

    monkeypatch.setattr(run.tempfile, "mkstemp", probe_then_sweep)
    assert run.prepare(out, None, False, main=False) is None
    monkeypatch.setattr(run.tempfile, "mkstemp", mkstemp)
    listed = run.glob.glob
    monkeypatch.setattr(run.glob, "glob", lambda pattern: listed(pattern) + [pattern.replace("*", "gone")] * (
        ".write_test" in pattern))
    assert run.prepare(out, None, False, main=True) is None
    assert os.listdir(out) == []


def test_garbage_and_incompatible_checkpoints(data, tmp_path, capsys):
    base = ["train", "--config", "one_stage_focal", "--ann", data["train_ann"], "--images", data["image_root"],
            "--max-iter", "2", "--batch-size", "4", "--set", "data.min_size=64", "--set", "data.max_size=64"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 50)
    assert ltk(base + ["--out", str(tmp_path / "a"), "--resume", str(garbage)]) == 2
    assert "garbage.pt: not a readable checkpoint" in capsys.readouterr().err
    weights = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, weights)
    assert ltk(base + ["--out", str(tmp_path / "b"), "--resume", str(weights)]) == 2
    assert "cannot resume a run: the checkpoint has no optimizer" in capsys.readouterr().err
    assert ltk(base + ["--out", str(tmp_path / "c"), "--resume"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    assert ltk(base + ["--out", str(tmp_path / "d"), "--no-eval"]) == 0
    capsys.readouterr()
    other = base + ["--out", str(tmp_path / "e"), "--config", "one_stage_efl",
                    "--resume", str(tmp_path / "d" / "checkpoint.pt")]
    assert ltk(other) == 2 and "model.cls_loss" in capsys.readouterr().err


def test_unwritable_out_fails_before_any_work(data, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: an out below a regular file is unwritable for all
        ro = tmp_path / "file"
        ro.write_text("x")
        ro = ro / "sub"
    monkeypatch.setattr(trainer, "build_dataset", lambda *a, **k: pytest.fail("work began"))
    assert ltk(["train", "--ann", data["train_ann"], "--images", data["image_root"], "--out", str(ro)]) == 2
    assert "cannot write there" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--set", "model.efl_scael=4"], "did you mean model.efl_scale?"),
    (["--set", "solvr.lr=0.1"], "did you mean solver?"),
    (["--set", "solver.lr=fast"], "solver.lr must be a number"),
    (["--batch-size", "0"], "solver.batch_size must be > 0"),
    (["--max-iter", "-3"], "solver.max_iter must be > 0"),
    (["--config", "no_such_config"], "unknown config 'no_such_config'"),
])
def test_cli_user_errors_are_one_line_exit_2(data, tmp_path, capsys, args, message):
    rc = ltk(["train", "--ann", data["train_ann"], "--images", data["image_root"], "--out", str(tmp_path / "r"),
              *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_config_schema_rejects_unknown_keys_in_files(tmp_path):
    path = tmp_path / "my.json"
    path.write_text('{"base": "one_stage_efl", "model": {"efl_scael": 4.0}}')
    with pytest.raises(ConfigError, match="did you mean model.efl_scale"):
        get_config(str(path))
    cfg = get_config("one_stage_efl")
    set_value(cfg, "model.efl_scale", "4")
    assert cfg["model"]["efl_scale"] == 4.0 and isinstance(cfg["model"]["efl_scale"], float)
    for name in ("lvis_v1_two_stage_softmax", "lvis_v0.5_one_stage_efl", "two_stage_softmax"):
        assert get_config(name)["train"]["ckpt_every"] > 0


def test_wrong_images_dir(data, tmp_path, capsys):
    wrong = str(tmp_path / "wrong")
    os.makedirs(wrong)
    assert ltk(["train", "--ann", data["train_ann"], "--images", wrong, "--out", str(tmp_path / "r")]) == 2
    assert "none of the 16 images" in capsys.readouterr().err
    assert ltk(["train", "--ann", data["train_ann"], "--images", wrong + "x", "--out", str(tmp_path / "r")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as code:
        ltk(["--version"])
    assert code.value.code == 0 and capsys.readouterr().out.startswith("ltk ")


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(data, tmp_path):
    """A real `kill -9` of `ltk train` after a periodic checkpoint, then `--resume` without a path: the final weights
    equal an uninterrupted run's bit for bit, and the history has every iteration once."""
    import signal
    import subprocess
    import sys
    import time

    n = 40

    def command(out, *extra):
        return [sys.executable, "-m", "ltkernels.models.cli", "train", "--config", "one_stage_efl",
                "--ann", data["train_ann"], "--images", data["image_root"], "--out", str(out), "--max-iter", str(n),
                "--batch-size", "2", "--ckpt-every", "3", "--no-eval", "--set", "data.min_size=64",
                "--set", "data.max_size=64", "--set", "solver.warmup_iters=2", *extra]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(command(full), check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    pointer = killed / "last_checkpoint"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "checkpoint_0000006.pt":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = pointer.read_text().strip()
    assert killed_at.startswith("checkpoint_0") and not (killed / "checkpoint.pt").exists()  # before the end
    subprocess.run(command(killed, "--resume"), check=True, capture_output=True, env=env, timeout=600)
    a = ck.load_checkpoint(str(full / "checkpoint.pt"))
    b = ck.load_checkpoint(str(killed / "checkpoint.pt"))
    assert a["iteration"] == b["iteration"] == n
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    iters = [r["iter"] for r in read_jsonl(str(killed / "metrics.jsonl")) if r["type"] == "train"]
    assert iters == list(range(1, n + 1))
    assert not [f for f in os.listdir(killed) if f.endswith(".tmp")]

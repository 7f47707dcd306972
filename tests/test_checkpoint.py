"""Loading a checkpoint never runs code from it: every load path (`--resume`, `--base`, `ltk eval --checkpoint`,
`--pretrained-backbone`) refuses a file that needs unpickling beyond tensors and plain values, names the file and
the type, and runs nothing; `--trust-checkpoint` loads a checkpoint of the older format, and resuming from it is
still exact."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
from test_training import data  # noqa: F401 (the training tests' tiny synthetic set)
from test_training import tiny_cfg as training_cfg

from ltkernels.models.cli import main as ltk
from ltkernels.models.engine.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    check_plain,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ltkernels.models.engine.trainer import train

ENV = "LTK_TEST_CHECKPOINT_PAYLOAD"


class SetsEnv:
    """Unpickling this runs `exec`, which sets an environment variable."""

    def __reduce__(self):
        return exec, (f"import os; os.environ[{ENV!r}] = 'ran'",)


class CreatesFile:
    """Unpickling this opens (creates) a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def tiny_cfg(name, max_iter, **train_kw):
    return training_cfg(name, max_iter, warmup_iters=2, **train_kw)


@pytest.fixture(params=["zip_env", "legacy_file", "raw_pickle_file"])
def crafted(request, tmp_path):
    """A file that looks like a checkpoint; loading it unsafely sets ENV or creates `marker`."""
    marker = tmp_path / "payload_ran"
    path = str(tmp_path / f"{request.param}.pt")
    state = {"model": {"w": torch.zeros(2)}, "iteration": 3}
    if request.param == "zip_env":
        torch.save({**state, "optimizer": SetsEnv()}, path)
    elif request.param == "legacy_file":
        torch.save({**state, "rng": CreatesFile(str(marker))}, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump({**state, "model": CreatesFile(str(marker))}, f, protocol=4)
    os.environ.pop(ENV, None)
    return {"path": path, "marker": marker, "type": "builtins.exec" if request.param == "zip_env" else "io.open"}


def assert_nothing_ran(crafted):
    assert ENV not in os.environ and not crafted["marker"].exists()


def test_crafted_payloads_do_run_when_unpickled(crafted):
    """The files of the tests below are real exploits: full unpickling runs them."""
    with open(crafted["path"], "rb") as f:
        try:
            torch.load(f, weights_only=False)
        except Exception:  # the raw pickle is not a torch file, but its payload runs first
            pass
    assert ENV in os.environ or crafted["marker"].exists()
    os.environ.pop(ENV, None)


def test_loader_refuses_and_names_file_and_type(crafted):
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(crafted["path"])
    assert crafted["path"] in str(err.value) and crafted["type"] in str(err.value)
    assert "--trust-checkpoint" in str(err.value)
    assert_nothing_ran(crafted)


def test_resume_refuses(crafted, data, tmp_path, capsys):
    rc = ltk(["train", "--config", "one_stage_focal", "--ann", data["train_ann"], "--images", data["image_root"],
              "--out", str(tmp_path / "run"), "--max-iter", "2", "--resume", crafted["path"]])
    assert rc == 2
    err = capsys.readouterr().err
    assert crafted["path"] in err and crafted["type"] in err
    assert_nothing_ran(crafted)
    assert os.listdir(tmp_path / "run") == []  # refused before any work (only the writable check ran)


def test_base_refuses(crafted, data, tmp_path, capsys):
    rc = ltk(["train", "--config", "two_stage_bags", "--ann", data["train_ann"], "--images", data["image_root"],
              "--out", str(tmp_path / "run"), "--max-iter", "2", "--base", crafted["path"]])
    assert rc == 2 and crafted["type"] in capsys.readouterr().err
    assert_nothing_ran(crafted)


def test_eval_refuses(crafted, data, tmp_path, capsys):
    rc = ltk(["eval", "--checkpoint", crafted["path"], "--ann", data["val_ann"], "--images", data["image_root"]])
    assert rc == 2
    err = capsys.readouterr().err
    assert crafted["path"] in err and crafted["type"] in err
    assert_nothing_ran(crafted)


def test_pretrained_backbone_refuses(crafted, data, tmp_path, capsys):
    rc = ltk(["train", "--config", "two_stage_softmax", "--ann", data["train_ann"], "--images", data["image_root"],
              "--out", str(tmp_path / "run"), "--max-iter", "2", "--set", "model.backbone=resnet18",
              "--pretrained-backbone", crafted["path"]])
    assert rc == 2 and crafted["type"] in capsys.readouterr().err
    assert_nothing_ran(crafted)


def test_trust_runs_full_unpickling_only_when_asked(tmp_path):
    path = str(tmp_path / "old.pt")
    torch.save({"numpy_state": np.random.get_state()}, path)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load_checkpoint(path)
    state = load_checkpoint(path, trust=True)
    assert state["numpy_state"][0] == "MT19937"


def test_unreadable_files_are_named(tmp_path):
    for name, content in (("empty.pt", b""), ("garbage.pt", b"not a checkpoint at all " * 8),
                          ("truncated.pt", None)):
        path = tmp_path / name
        if content is None:
            torch.save({"w": torch.arange(1000.0)}, path)
            content = path.read_bytes()[:300]
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as err:
            load_checkpoint(str(path))
        assert str(path) in str(err.value) and not isinstance(err.value, UnsafeCheckpointError)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_save_refuses_what_the_safe_loader_cannot_read(tmp_path):
    for bad in ({"lr": np.float64(0.1)}, {"steps": {1, 2}}, {"rng": np.random.get_state()},
                {"obj": CreatesFile("x")}):
        with pytest.raises(TypeError, match="checkpoint"):
            save_checkpoint(str(tmp_path / "bad.pt"), bad)
    assert not (tmp_path / "bad.pt").exists()
    check_plain({"a": [1, 2.0, "s", None, True, (torch.ones(1),)], "b": torch.nn.Parameter(torch.ones(1))})


def test_rng_states_round_trip_bitwise(tmp_path):
    random.seed(3)
    np.random.seed(4)
    np.random.randn()  # leaves numpy's cached gaussian set
    torch.manual_seed(5)
    path = str(tmp_path / "rng.pt")
    save_checkpoint(path, {"rng": [rng_state()]})
    first = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    saved = torch.load(path, weights_only=True)["rng"][0]  # plain torch, weights only
    set_rng_state(saved)
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == first


def _old_format(ckpt: dict) -> dict:
    """The same checkpoint as older versions wrote it: Python's and numpy's RNG states as their own tuples."""
    old_rng = []
    for r in ckpt["rng"]:
        set_rng_state(r)
        old_rng.append({"python": random.getstate(), "numpy": np.random.get_state(), "torch": r["torch"]})
    old = {k: v for k, v in ckpt.items() if k not in ("format", "best", "elapsed")}
    old["rng"] = old_rng
    # configs were stored as written, without the schema's defaults
    old["config"] = {**ckpt["config"], "model": {k: v for k, v in ckpt["config"]["model"].items()
                                                 if k not in ("sampling_ratio", "canonical_level", "focal_alpha")}}
    return old


def test_trusted_old_checkpoint_resumes_exactly(data, tmp_path, capsys):
    n = 4
    full = train(tiny_cfg("two_stage_softmax", n, ckpt_every=2), data["train_ann"], data["image_root"],
                 str(tmp_path / "full"), progress=False)
    mid = str(tmp_path / "full" / "checkpoint_0000002.pt")
    old = str(tmp_path / "old.pt")
    torch.save(_old_format(load_checkpoint(mid)), old)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        train(tiny_cfg("two_stage_softmax", n), data["train_ann"], data["image_root"], str(tmp_path / "refused"),
              resume=old, progress=False)
    res = train(tiny_cfg("two_stage_softmax", n), data["train_ann"], data["image_root"], str(tmp_path / "resumed"),
                resume=old, progress=False, trust_checkpoint=True)
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in full["history"][2:]]
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, res["model"].state_dict()[k]), k
    # the resumed run writes the new format again; eval of the old file needs the opt-in
    torch.load(res["checkpoint"], weights_only=True)
    args = ["eval", "--checkpoint", old, "--ann", data["val_ann"], "--images", data["image_root"]]
    assert ltk(args) == 2 and "--trust-checkpoint" in capsys.readouterr().err
    assert ltk(args + ["--trust-checkpoint"]) == 0 and "APr" in capsys.readouterr().out


def test_pretrained_backbone_loads_safely(tmp_path):
    import torchvision

    from ltkernels.models.detectors.backbone import ResNetFPNBackbone

    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    path = str(tmp_path / "resnet18.pth")
    torch.save(imagenet, path)
    backbone = ResNetFPNBackbone("resnet18")
    backbone.load_pretrained(load_checkpoint(path), path)
    assert torch.equal(backbone.body.body.conv1.weight, imagenet["conv1.weight"])
    assert torch.equal(backbone.body.body.layer4[1].bn2.running_var, imagenet["layer4.1.bn2.running_var"])
    wrong = str(tmp_path / "wrong.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match="wrong.pth is not a resnet18 state_dict"):
        ResNetFPNBackbone("resnet18").load_pretrained(load_checkpoint(wrong), wrong)

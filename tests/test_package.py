"""The package layer: build information, the torch-mismatch guard, op registration."""
import os

import pytest
import torch

import ltkernels
from ltkernels import _ext

from conftest import CHECKOUT_GUARDED

OPS = ["roi_align", "_roi_align_backward", "nms", "batched_nms", "multiclass_nms", "group_softmax_loss",
       "group_softmax_scores", "equalized_focal_loss"]


def test_build_info_describes_the_build():
    info = ltkernels.build_info()
    assert info["version"] == ltkernels.__version__
    assert _ext._major_minor(info["torch_version"]) == _ext._major_minor(torch.__version__)
    assert isinstance(info["cuda"], bool) and info["openmp"]
    if info["cuda"]:
        assert "90" in info["cuda_architectures"].split(",") or info["cuda_architectures"]
    info["version"] = "changed"  # a copy: callers cannot corrupt the module's record
    assert ltkernels.build_info()["version"] == ltkernels.__version__


@pytest.mark.parametrize("built,installed,ok", [
    ("2.14.1", "2.14.1+cu130", True), ("2.14.0", "2.14.1", True),
    ("2.11.0", "2.14.1", False), ("3.0.0", "2.14.1", False)])
def test_torch_mismatch_is_a_clear_error(built, installed, ok):
    if ok:
        _ext.check_torch_matches(built, installed)
    else:
        with pytest.raises(ltkernels.LibraryMismatchError, match=f"built against torch {built}.*Rebuild"):
            _ext.check_torch_matches(built, installed)


@pytest.mark.parametrize("name", OPS)
def test_ops_are_registered_with_the_dispatcher(name):
    assert _ext.has_op(name), f"torch.ops.ltkernels.{name} is not registered"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ltkernels::{name}", "CPU")
    if ltkernels.has_cuda_kernels():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ltkernels::{name}", "CUDA")


@pytest.mark.skipif(not CHECKOUT_GUARDED, reason="the checkout sits in a shared folder (/, the temporary or home folder)")
def test_tests_cannot_read_beside_the_checkout(tmp_path):
    """The checkout guard (tests/conftest.py) refuses sibling folders of the repository, so a test that needs a file
    the repository does not hold fails here instead of passing only where that folder happens to exist."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    with pytest.raises(PermissionError, match="outside the checkout"):
        open(root.parent / "data" / "anything.json")
    with pytest.raises(PermissionError, match="outside the checkout"):
        os.listdir(root.parent)
    (tmp_path / "f").write_text("ok")  # elsewhere (temporary folders, the installed packages) is allowed
    assert (root / "pyproject.toml").read_text()


def test_cli_names_the_missing_extra(monkeypatch, capsys):
    from ltkernels.models import cli

    def needs_lvis(args):
        raise ModuleNotFoundError("No module named 'lvis'", name="lvis")

    monkeypatch.setattr(cli, "cmd_configs", needs_lvis)
    assert cli.main(["configs"]) == 2
    assert "pip install 'ltkernels[models]'" in capsys.readouterr().err

    def needs_other(args):
        raise ModuleNotFoundError("No module named 'notapackage'", name="notapackage")

    monkeypatch.setattr(cli, "cmd_configs", needs_other)
    with pytest.raises(ModuleNotFoundError):  # not ours to explain: the traceback stays
        cli.main(["configs"])


def test_wheel_metadata_pins_the_torch_minor_it_was_built_against():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "build_metadata.py"
    spec = importlib.util.spec_from_file_location("build_metadata", path)
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)
    assert meta.torch_requirement("2.14.1+cu130") == "torch==2.14.*"
    assert meta.torch_requirement("2.11.0") == "torch==2.11.*"
    deps = meta.dynamic_metadata("dependencies")
    assert deps[0] == meta.torch_requirement(torch.__version__) and "numpy" in deps
    assert not any(d.startswith(("torchvision", "tqdm", "lvis")) for d in deps)  # the models extra's


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], []])
def test_ltk_front_end_answers_without_importing_torch(argv):
    """`ltk --help` / `--version` / usage errors are answered by the torch-free front end (at once)."""
    import subprocess
    import sys

    code = ("import sys, ltkernels_cli\n"
            "try:\n    ltkernels_cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().endswith(("NO-TORCH 0", "NO-TORCH 2")), proc.stdout + proc.stderr
    assert ("usage: ltk" in proc.stdout + proc.stderr) or "ltk 0." in proc.stdout

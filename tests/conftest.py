from pathlib import Path

import pytest
import torch

from ltkernels.models.evaluation.lvis_eval import BACKENDS
from ltkernels.testing import cuda_emulation as emulation
from ltkernels.testing.checkout_guard import forbid_sibling_reads

CHECKOUT_GUARDED = forbid_sibling_reads(Path(__file__).resolve().parents[1])

CUDA = torch.cuda.is_available()
EMULATION = emulation.available()


class EmulatedCUDA(str):
    """The device of a test's CUDA side under the CPU emulation of the CUDA kernels: the string "cpu" (CPU tensors
    stand for CUDA ones) carrying the thread order; the `_emulated_cuda` fixture runs the test body under it."""

    def __new__(cls, order: str):
        self = super().__new__(cls, "cpu")
        self.order = order
        return self


def _emulated_params():
    return [pytest.param(EmulatedCUDA(order), marks=pytest.mark.cuda, id=f"emu-{order}")
            for order in emulation.ORDERS]


def devices(emulated: bool = True):
    """The devices a test runs on: CPU; a real GPU (marked `cuda` and `gpu`, skipped without one); and, unless
    `emulated` is False (tests of the registrations themselves: opcheck, torch.compile), the CUDA kernels under the
    CPU emulation in forward, reverse and random thread order (marked `cuda`)."""
    gpu = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpu], id="cuda")
    return ["cpu", gpu, *(_emulated_params() if emulated else [])]


def cuda_devices():
    """The CUDA devices alone: the real GPU (skipped without one) and the emulation's three orders."""
    return devices()[1:]


class CudaSide:
    """The CUDA side of a CPU-vs-CUDA test: `with side:` runs its calls on the GPU or under the emulation;
    `side.put(t)` moves a tensor (or module) there, `side.device` names the device."""

    def __init__(self, device):
        self.device = device
        self.emulated = isinstance(device, EmulatedCUDA)
        self._mode = None

    def put(self, t):
        return t.to(self.device, copy=True) if isinstance(t, torch.Tensor) else t.to(self.device)

    def __enter__(self):
        if self.emulated:
            self._mode = emulation.cuda_emulation(order=self.device.order, seed=_SEED)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None


_SEED = 0


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpu], id="cuda"),
                        *_emulated_params()])
def cuda_side(request):
    """Parametrises a CPU-vs-CUDA test over the real GPU and the emulation's three orders."""
    return CudaSide(request.param)


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """Runs the whole body of a test parametrised with an emulated `device` under the CUDA emulation."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    emulated = [v for k, v in params.items() if k == "device" and isinstance(v, EmulatedCUDA)]
    if not emulated:
        yield
        return
    with emulation.cuda_emulation(order=emulated[0].order, seed=_SEED):
        yield


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA device visible")
    no_emulation = pytest.mark.skip(reason="this build has no CUDA emulation (LTK_CUDA_EMU=ON, Boost.Context)")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(no_gpu)
        elif "cuda" in item.keywords and "gpu" not in item.keywords and not EMULATION:
            item.add_marker(no_emulation)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each hand-built evaluation case runs on both evaluators with the same expected numbers."""
    if request.param == "faster-coco-eval":
        pytest.importorskip("faster_coco_eval")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

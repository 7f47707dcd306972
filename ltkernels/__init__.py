"""ltkernels: fast, exact kernels for long-tail object detection.

Every public function calls one registered op, `torch.ops.ltkernels.<name>`, which the dispatcher sends to the CPU
or CUDA kernel; fake-tensor and autograd registrations live beside each op in `ltkernels/ops/`.
"""
from ._ext import LibraryMismatchError, build_info, has_cuda_kernels, release_cpu_buffers
from ._validate import ArgumentTypeError, ArgumentValueError, BoxesShapeError
from .ops import eqlv2_loss as _eqlv2
from .ops import equalized_focal_loss as _efl
from .ops import equalized_quality_focal_loss as _eqfl
from .ops import federated_loss as _fed
from .ops import group_softmax as _gs
from .ops import nms as _nms
from .ops import paste_masks as _pm
from .ops import poolers as _pl
from .ops import roi_align as _ra
from .ops import seesaw_loss as _seesaw
from .ops.eqlv2_loss import *  # noqa: F401,F403
from .ops.equalized_focal_loss import *  # noqa: F401,F403
from .ops.equalized_quality_focal_loss import *  # noqa: F401,F403
from .ops.federated_loss import *  # noqa: F401,F403
from .ops.group_softmax import *  # noqa: F401,F403
from .ops.nms import *  # noqa: F401,F403
from .ops.paste_masks import *  # noqa: F401,F403
from .ops.poolers import *  # noqa: F401,F403
from .ops.roi_align import *  # noqa: F401,F403
from .ops.seesaw_loss import *  # noqa: F401,F403
from .torchvision_compat import TorchvisionPatch, patch_torchvision

__version__ = build_info()["version"]

__all__ = ["build_info", "has_cuda_kernels", "release_cpu_buffers", "LibraryMismatchError", "__version__", "ArgumentTypeError",
           "ArgumentValueError", "BoxesShapeError", "patch_torchvision", "TorchvisionPatch", *_efl.__all__,
           *_eqfl.__all__, *_eqlv2.__all__, *_fed.__all__, *_seesaw.__all__, *_gs.__all__, *_nms.__all__, *_pm.__all__, *_pl.__all__, *_ra.__all__]

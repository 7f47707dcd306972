"""Backbones with an FPN: a small from-scratch CNN for the synthetic demo, torchvision's ResNet-50 for real runs.

Every backbone returns an OrderedDict of feature maps, fine to coarse, all with `out_channels` channels, and
carries `strides` (one per map) so that anchors and the RoI pooler can be configured from it.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..configs.schema import model_config


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyFPNBackbone(nn.Module):
    """Stem (stride 2) and four stages (strides 4..32), each a strided and a plain 3x3 conv-BN-ReLU; an FPN over
    the stages named by `levels` (2 -> stride 4, ..., 5 -> stride 32)."""

    def __init__(self, widths=(16, 32, 48, 64, 96), out_channels: int = 64, levels=(2, 3, 4)):
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 2)
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn(widths[i], widths[i + 1], 2), _conv_bn(widths[i + 1], widths[i + 1], 1))
            for i in range(4))
        self.levels = tuple(levels)
        self.fpn = FeaturePyramidNetwork([widths[lv - 1] for lv in self.levels], out_channels)
        self.out_channels = out_channels
        self.strides = tuple(2 ** lv for lv in self.levels)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        feats = OrderedDict()
        for lv, stage in enumerate(self.stages, start=2):
            x = stage(x)
            if lv in self.levels:
                feats[str(lv)] = x
            if lv >= max(self.levels):
                break
        return self.fpn(feats)


class ResNetFPNBackbone(nn.Module):
    """torchvision ResNet-50 (frozen BN, first stage frozen) + FPN: P2-P6 for the two-stage model (LastLevelMaxPool),
    P3-P7 for the one-stage model (LastLevelP6P7). ImageNet weights come in through `load_pretrained`."""

    def __init__(self, name: str = "resnet50", one_stage: bool = False, trainable_layers: int = 3,
                 out_channels: int = 256):
        super().__init__()
        from torchvision.models import resnet
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.name = name
        body = getattr(resnet, name)(weights=None, norm_layer=FrozenBatchNorm2d)
        layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        for pname, p in body.named_parameters():
            p.requires_grad_(any(pname.startswith(layer) for layer in layers))
        returned = [2, 3, 4] if one_stage else [1, 2, 3, 4]
        in_list = [(body.inplanes // 8) * 2 ** (i - 1) for i in returned]
        extra = LastLevelP6P7(out_channels, out_channels) if one_stage else LastLevelMaxPool()
        self.body = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in returned}, in_list, out_channels,
                                    extra_blocks=extra)
        self.out_channels = out_channels
        self.strides = (8, 16, 32, 64, 128) if one_stage else (4, 8, 16, 32, 64)

    def forward(self, x):
        return self.body(x)

    def load_pretrained(self, state, source: str) -> None:
        """Load an ImageNet classification state_dict of this ResNet (its `fc.*` entries are not used), plain
        or under a `state_dict` key. `source` names the file in errors."""
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{source} is not a {self.name} state_dict (a dict of tensors)")
        resnet = self.body.body
        try:
            missing, _ = resnet.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{source} is not a {self.name} state_dict: {err}") from None
        if missing:
            raise ValueError(f"{source} is not a {self.name} state_dict (missing {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''})")


def build_backbone(cfg, one_stage: bool = False) -> nn.Module:
    """The backbone of a model config (`ModelConfig` or its dict)."""
    cfg = model_config(cfg)
    kind = cfg.backbone
    if kind == "tiny":
        return TinyFPNBackbone(tuple(cfg.widths), cfg.fpn_channels or 64,
                               tuple(cfg.levels))
    if kind.startswith("resnet"):
        return ResNetFPNBackbone(kind, one_stage, cfg.trainable_layers,
                                 cfg.fpn_channels or 256)
    raise ValueError(f"unknown backbone {kind!r}")

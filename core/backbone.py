"""ResNet backbone with frozen batch norm, returning C3-C5 (or C5) with their padding masks and position encodings.

The ResNet uses torchvision's module names (``conv1``, ``bn1``, ``layer1.0.downsample.0``...), so a
torchvision ImageNet state_dict loads into ``Backbone.body`` as is, and the whole backbone saves under
the authors' keys ``backbone.0.body.*``.

Legend: N batch, H x W input image, Hl x Wl feature map of level l, Ch_l its channels (C3-C5 name
ResNet stages, as in the paper).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.position_encoding import PositionEmbeddingSine

log = logging.getLogger(__name__)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (never trained).

    Detection batches are too small for batch statistics, so the ImageNet ones are kept. Loading
    ignores ``num_batches_tracked`` from an ordinary BatchNorm2d state_dict.

    Args:
        num_features: channels.
        eps: added to the variance, as in BatchNorm2d (torchvision's frozen version lacked it).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.eps = eps

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # One pass over x (shift + x * scale in one kernel) instead of a multiply and an add, each a
        # full read and write of the activation. Cast so that under autocast a half-precision
        # activation stays half precision.
        return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1
    ):
        super().__init__()
        if dilation > 1:
            raise ValueError(f"BasicBlock does not support dilation > 1, got dilation={dilation}")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision's ResNet v1.5), 1x1 expand, with a residual (ResNet-50/101)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1
    ):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """torchvision's ResNet trunk without the classifier (no avgpool, no fc), with frozen batch norm.

    Args:
        name: one of RESNET_SPECS.
        dilation: replace the stride of layer4 by dilation (DC5): C5 at stride 16.
    """

    def __init__(self, name: str, dilation: bool = False) -> None:
        super().__init__()
        if name not in RESNET_SPECS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_SPECS)}, got {name!r}")
        block, layers = RESNET_SPECS[name]
        self.inplanes, self._dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilation)
        # Channels of C2..C5, read off the blocks rather than hard-coded for ResNet-50.
        self.out_channels = tuple(64 * 2**i * block.expansion for i in range(4))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), FrozenBatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(N, 3, H, W) -> [C3, C4, C5] at strides 8, 16, 32 (16 for C5 with dilation)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class Backbone(nn.Module):
    """A ResNet that returns C3-C5 (``return_interm_layers``) or C5 alone, with downsampled masks.

    Args:
        name: resnet18, resnet34, resnet50 or resnet101.
        train_backbone: train layer2-layer4; the stem and layer1 are always frozen, as in DETR.
        return_interm_layers: return C3, C4, C5 (multi-scale) instead of C5 only.
        dilation: DC5, see ResNet.
    """

    def __init__(
        self, name: str, train_backbone: bool = True, return_interm_layers: bool = True, dilation: bool = False
    ):
        super().__init__()
        self.body = ResNet(name, dilation=dilation)
        for pname, parameter in self.body.named_parameters():
            if not train_backbone or not pname.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        c5_stride = 16 if dilation else 32
        self.return_interm_layers = return_interm_layers
        if return_interm_layers:
            self.strides = [8, 16, c5_stride]
            self.num_channels = list(self.body.out_channels[1:])
        else:
            self.strides = [c5_stride]
            self.num_channels = [self.body.out_channels[3]]

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Feature maps with the image mask resized to each.

        Args:
            images: (N, 3, H, W) normalized images.
            mask: (N, H, W) bool, True at padding.

        Returns:
            Per returned level, (feature (N, Ch_l, Hl, Wl), mask (N, Hl, Wl) bool).
        """
        features = self.body(images)
        if not self.return_interm_layers:
            features = features[-1:]
        return [(x, downsample_mask(mask, x.shape[-2:])) for x in features]


def downsample_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """(N, H, W) bool -> (N, h, w) bool by nearest-neighbour resizing, as the authors do."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class Joiner(nn.Sequential):
    """Backbone (index 0) and position encoding (index 1), named as in the authors' checkpoints.

    Args:
        backbone: the feature extractor.
        position_embedding: encodes a mask into (N, d_model, h, w).
    """

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Features, masks and position encodings of every backbone level.

        Args:
            images: (N, 3, H, W).
            mask: (N, H, W) bool, True at padding.

        Returns:
            features: per level (N, Ch_l, Hl, Wl); masks: per level (N, Hl, Wl) bool;
            pos: per level (N, d_model, Hl, Wl) in the features' dtype.
        """
        features, masks, pos = [], [], []
        for x, m in self[0](images, mask):
            features.append(x)
            masks.append(m)
            pos.append(self[1](m).to(x.dtype))
        return features, masks, pos


def load_backbone_weights(body: ResNet, source: str) -> None:
    """Loads a torchvision-layout ResNet state_dict (ImageNet weights) into ``body``.

    The classifier (``fc.*``) and ``num_batches_tracked`` are ignored; anything else that does not
    match raises.

    Args:
        body: the ResNet trunk (``Backbone.body``).
        source: a local file, or an http(s) URL fetched once into torch.hub's cache.
    """
    if source.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False, weights_only=True)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"backbone_weights {source!r} must hold a state_dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"backbone_weights {source!r} do not match a torchvision ResNet layout: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    log.info("loaded backbone weights from %s", source)


def build_backbone(
    name: str,
    d_model: int,
    num_feature_levels: int,
    dilation: bool = False,
    position_embedding_scale: float | None = None,
    weights: str | None = None,
    train_backbone: bool = True,
) -> Joiner:
    """The backbone plus sine position encoding the detector expects.

    Args:
        name: ResNet depth name.
        d_model: transformer width; the position encoding has this many channels.
        num_feature_levels: 1 returns C5 only, more returns C3-C5.
        dilation: DC5.
        position_embedding_scale: range of the normalized positions (2*pi by default).
        weights: optional torchvision ResNet state_dict path or URL.
        train_backbone: False freezes the whole ResNet.
    """
    backbone = Backbone(
        name, train_backbone=train_backbone, return_interm_layers=num_feature_levels > 1, dilation=dilation
    )
    if weights is not None:
        load_backbone_weights(backbone.body, weights)
    position_embedding = PositionEmbeddingSine(d_model // 2, normalize=True, scale=position_embedding_scale)
    return Joiner(backbone, position_embedding)

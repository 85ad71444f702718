"""The image-classification networks of the seed papers' experiments.

Each builder takes the input shape ``(channels, height, width)`` and the number of classes, so the
same backbone runs on 8×8 digits, 28×28 MNIST and 32×32 CIFAR-10 images:

======================  ==========================================================================
``mlp``                 fully connected, ReLU, configurable hidden widths (MoMo's MNIST MLP is
                        100-100, QLAB's is 1024-1000-1000)
``lenet5``              LeCun et al. 1998: conv5(6)-pool-conv5(16)-pool-120-84, ReLU and max-pool
``small_cnn``           two VGG-style blocks (conv3-BN-ReLU ×2, max-pool, dropout) and a dense
                        head with dropout: the "CNN" of QLAB's CIFAR-10 experiments
``resnet20``            He et al. 2016, the CIFAR ResNet (3 stages × 3 basic blocks, 16/32/64
                        channels, parameter-free shortcuts), written here
``resnet18/34``         torchvision's ResNet with the usual CIFAR stem (3×3 conv, no max-pool)
``vgg16_bn``            VGG-16 with BatchNorm (torchvision's layout) and a CIFAR head (512 → classes)
``shufflenet_v2``       torchvision's ShuffleNet-V2 ×1.0, with the CIFAR stem when asked
======================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BACKBONES", "BackboneName", "build_backbone"]

BackboneName = Literal["mlp", "lenet5", "small_cnn", "resnet20", "resnet18", "resnet34", "vgg16_bn", "shufflenet_v2"]


# --------------------------------------------------------------------------- written here


def mlp(in_features: int, hidden_sizes: Sequence[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Flatten, then ``Linear-ReLU(-Dropout)`` per hidden width, then the output layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _flat_size(features: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of features ``features`` produces for one input: found by running it once."""
    with torch.no_grad():
        was_training = features.training
        features.eval()  # BatchNorm cannot train on a single example
        size = features(torch.zeros(1, *input_shape)).numel()
        features.train(was_training)
    return size


def lenet5(input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """LeNet-5 with ReLU and max-pooling; the first convolution pads by 2 so 28×28 MNIST fits.

    Needs inputs of at least 12×12 (the two 5×5 convolutions and two poolings).
    """
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 6, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    return nn.Sequential(
        features,
        nn.Linear(_flat_size(features, input_shape), 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )


def small_cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int], dropout: float) -> nn.Sequential:
    """Blocks of ``(conv3-BN-ReLU) ×2, max-pool, dropout``, one per entry of ``channels``, then a
    256-unit dense layer with dropout ``2·dropout`` (capped at 0.5) and the output layer."""
    layers: list[nn.Module] = []
    width = input_shape[0]
    for out in channels:
        for _ in range(2):
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(
        features,
        nn.Linear(_flat_size(features, input_shape), 256),
        nn.ReLU(inplace=True),
        nn.Dropout(min(2 * dropout, 0.5)),
        nn.Linear(256, num_classes),
    )


class _CifarBasicBlock(nn.Module):
    """ResNet basic block with He et al.'s CIFAR shortcut ("option A"): when the shape changes,
    the identity is subsampled by 2 and zero-padded in channels, so the shortcut has no weights."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad_channels = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            half = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth ``6n + 2`` (n = 3: ResNet-20, n = 18: ResNet-110).

    A 3×3 convolution with 16 channels, three stages of ``n`` basic blocks (16, 32, 64 channels,
    the last two starting with stride 2), global average pooling and a linear classifier.  Kaiming
    initialisation of the convolutions and the linear layer, as the paper.
    """

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(_CifarBasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


#: VGG-16's configuration "D": output channels of each 3×3 convolution, "M" for a 2×2 max-pool.
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(in_channels: int, num_classes: int, dropout: float) -> nn.Module:
    """VGG-16 with BatchNorm, laid out and initialised as torchvision's ``vgg16_bn`` (same
    ``features.N`` names), with the usual CIFAR head (global pooling to 512 features, dropout, one
    linear layer) instead of the 3-layer 4096-wide ImageNet head: 15M parameters instead of 134M.

    Built here rather than by trimming ``torchvision.models.vgg16_bn``, which would first allocate
    and initialise the 120M-parameter head (seconds per model).  Needs inputs of at least 32×32
    (five 2×2 poolings).
    """
    layers: list[nn.Module] = []
    width = in_channels
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        conv = nn.Conv2d(width, int(item), 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
        width = int(item)
    head = nn.Linear(512, num_classes)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(*layers))
    net.add_module("avgpool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flatten", nn.Flatten())
    net.add_module("classifier", nn.Sequential(nn.Dropout(dropout), head))
    return net


# --------------------------------------------------------------------------- from torchvision


def _cifar_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)


def torchvision_resnet(depth: Literal[18, 34], in_channels: int, num_classes: int, cifar_stem: bool) -> nn.Module:
    """torchvision's ResNet-18/34; ``cifar_stem`` replaces the 7×7/2 convolution and the max-pool
    (meant for 224×224 ImageNet images) by one 3×3/1 convolution, as is usual for 32×32 images."""
    from torchvision.models import resnet18, resnet34

    net = (resnet18 if depth == 18 else resnet34)(weights=None, num_classes=num_classes)
    if cifar_stem:
        net.conv1 = _cifar_conv(in_channels, 64)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def torchvision_shufflenet_v2(in_channels: int, num_classes: int, cifar_stem: bool) -> nn.Module:
    """torchvision's ShuffleNet-V2 ×1.0; ``cifar_stem`` makes the first convolution stride 1 and
    drops the max-pool, so 32×32 inputs reach the last stage at 4×4 rather than 1×1."""
    from torchvision.models import shufflenet_v2_x1_0

    net = shufflenet_v2_x1_0(weights=None, num_classes=num_classes)
    stem_out = net.conv1[0].out_channels
    if cifar_stem:
        net.conv1[0] = _cifar_conv(in_channels, stem_out)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1[0] = nn.Conv2d(in_channels, stem_out, 3, stride=2, padding=1, bias=False)
    return net


# --------------------------------------------------------------------------- registry


def _needs_image(name: str, input_shape: Sequence[int]) -> None:
    if len(input_shape) != 3:
        raise ValueError(f"backbone {name!r} needs image inputs (channels, height, width), got shape {tuple(input_shape)}")


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda shape, n, o: mlp(_numel(shape), o["hidden_sizes"], n, o["dropout"] or 0.0),
    "lenet5": lambda shape, n, o: lenet5(shape, n),
    "small_cnn": lambda shape, n, o: small_cnn(shape, n, o["channels"], 0.25 if o["dropout"] is None else o["dropout"]),
    "resnet20": lambda shape, n, o: CifarResNet(shape[0], n, blocks_per_stage=3),
    "resnet18": lambda shape, n, o: torchvision_resnet(18, shape[0], n, o["cifar_stem"]),
    "resnet34": lambda shape, n, o: torchvision_resnet(34, shape[0], n, o["cifar_stem"]),
    "vgg16_bn": lambda shape, n, o: vgg16_bn(shape[0], n, 0.5 if o["dropout"] is None else o["dropout"]),
    "shufflenet_v2": lambda shape, n, o: torchvision_shufflenet_v2(shape[0], n, o["cifar_stem"]),
}
"""Backbone name → builder ``(input_shape, num_classes, options) → nn.Module``."""


def _numel(shape: Sequence[int]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def build_backbone(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden_sizes: Sequence[int] = (100, 100),
    channels: Sequence[int] = (32, 64),
    dropout: float | None = None,
    cifar_stem: bool = True,
) -> nn.Module:
    """Build backbone ``name`` for inputs of ``input_shape`` and check that one input goes through.

    Args:
        name: a key of :data:`BACKBONES`.
        input_shape: one example's shape, ``(channels, height, width)`` (the MLP also takes ``(features,)``).
        num_classes: the number of output logits.
        hidden_sizes: the MLP's hidden widths.
        channels: the small CNN's block widths.
        dropout: dropout rate; ``None`` means the backbone's own default (MLP 0, small CNN 0.25 after
            the convolutions and 0.5 in the head, VGG 0.5); the other backbones have no dropout.
        cifar_stem: for ResNet-18/34 and ShuffleNet-V2, the small-image stem (3×3 conv, no max-pool).

    Raises:
        ValueError: unknown name, bad sizes, or an input too small for the backbone.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(f"input_shape must hold positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if name != "mlp":
        _needs_image(name, input_shape)
    options = {"hidden_sizes": tuple(hidden_sizes), "channels": tuple(channels), "dropout": dropout, "cifar_stem": cifar_stem}
    try:
        net = BACKBONES[name](input_shape, num_classes, options)
        # One example through, in eval mode (BatchNorm cannot normalise a batch of one): a shape
        # mismatch surfaces here, with the input size named, rather than mid-training.
        _flat_size(net, input_shape)
    except RuntimeError as err:
        raise ValueError(f"backbone {name!r} cannot take inputs of shape {input_shape}: {err}") from err
    return net

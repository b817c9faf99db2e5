"""The model zoo: one factory used by trainer, evaluator and the centralised baseline.

torchvision architectures (random init, no downloaded weights) adapted to the input:
the first convolution takes `in_channels`, and images of at most `SMALL_IMAGE_MAX` pixels
get a stride-1 stem and fewer early downsamplings so 28 x 28 keeps a useful feature map.
BatchNorm running statistics track faster than torchvision's ImageNet defaults where
those would lag a short federated round (see the `*_BN_MOMENTUM` constants).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

# torchvision is imported inside the builders that need it: importing it takes 5-15 s
# (it pulls in torch._dynamo), which every cnn-small service would pay at start-up.

SMALL_IMAGE_MAX = 64
"""Images up to this size use the small-image stems (MedMNIST's 28 x 28 ResNet recipe)."""

CNN_SMALL_BN_MOMENTUM = 0.3
"""cnn-small's BatchNorm running-stat momentum. A federated round is a few dozen local steps;
at torch's 0.1 the running statistics still carry ~30% of their initial (0, 1) values after
12 steps and the eval-mode model is badly miscalibrated (AUC 1.0, accuracy at chance)."""

CNN_SMALL_GN_GROUPS = 8
"""GroupNorm groups of `cnn-small-gn` (4, 8 and 16 channels per group)."""

MOBILENET_V3_BN_MOMENTUM = 0.1
"""torchvision's 0.01 suits long ImageNet schedules; over a short schedule it leaves the
running statistics near their initial values (see CNN_SMALL_BN_MOMENTUM)."""

Builder = Callable[[int, int, bool], nn.Module]
"""`(num_classes, in_channels, small_image) -> model`."""


class UnknownModel(ValueError):
    """A model name that is not in the zoo."""


Norm = Callable[[int], nn.Module]
"""`channels -> normalisation layer`."""


def _batch_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels, momentum=CNN_SMALL_BN_MOMENTUM)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(CNN_SMALL_GN_GROUPS, channels)


class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels, two 3x3 conv+norm+ReLU each), ~420k params.

    Two 2x2 max-pools (28 -> 7) then a 2x2 adaptive average pool, so any input of at
    least 4 x 4 works; a two-layer classifier with dropout. `norm` is BatchNorm by
    default; GroupNorm (`cnn-small-gn`) has no running statistics, so nothing in the
    model depends on which sites' data the last aggregate happened to come from.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.25,
        norm: Norm = _batch_norm,
    ) -> None:
        super().__init__()
        block = partial(_conv_norm_relu, norm=norm)
        self.features = nn.Sequential(
            *block(in_channels, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), *block(128, 128), nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits `(N, num_classes)`."""
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def _conv_norm_relu(cin: int, cout: int, *, norm: Norm) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True)]


def _cnn_small(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    return SmallCNN(in_channels=in_channels, num_classes=num_classes)


def _cnn_small_gn(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, norm=_group_norm)


def _resnet18(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    from torchvision.models import resnet18

    model: nn.Module = resnet18(weights=None, num_classes=num_classes)
    if small:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _mobilenet_v2(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    from torchvision.models import mobilenet_v2
    from torchvision.ops.misc import Conv2dNormActivation

    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]  # fmt: skip
    if small:
        setting[1][3] = 1  # with the stride-1 stem: total stride 8, 28 -> 4 x 4 features
    model: nn.Module = mobilenet_v2(
        weights=None, num_classes=num_classes, inverted_residual_setting=setting
    )
    stem = Conv2dNormActivation(
        in_channels, 32, stride=1 if small else 2,
        norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6,
    )  # fmt: skip
    _replace_stem(model, stem)
    return model


def _mobilenet_v3_small(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
    from torchvision.ops.misc import Conv2dNormActivation

    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small")
    if small:
        setting[0].stride = 1  # with the stride-1 stem: total stride 8
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=MOBILENET_V3_BN_MOMENTUM)
    model: nn.Module = MobileNetV3(setting, last_channel, num_classes=num_classes, norm_layer=norm)
    stem = Conv2dNormActivation(
        in_channels, setting[0].input_channels, kernel_size=3, stride=1 if small else 2,
        norm_layer=norm,
        activation_layer=nn.Hardswish,
    )  # fmt: skip
    _replace_stem(model, stem)
    return model


def _replace_stem(model: nn.Module, stem: nn.Module) -> None:
    """Put `stem` first in `model.features`, initialised as torchvision does the other convs."""
    for module in stem.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
    features = model.get_submodule("features")
    if not isinstance(features, nn.Sequential):
        raise TypeError(f"expected {type(model).__name__}.features to be nn.Sequential")
    features[0] = stem


_BUILDERS: dict[str, Builder] = {
    "cnn-small": _cnn_small,
    "cnn-small-gn": _cnn_small_gn,
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "resnet18": _resnet18,
}


def available_models() -> tuple[str, ...]:
    """Names `build_model` accepts."""
    return tuple(_BUILDERS)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    seed: int | None = None,
) -> nn.Module:
    """A freshly initialised zoo model for `in_channels` x `image_size` x `image_size` inputs.

    With `seed`, initialisation is deterministic and the global torch RNG is left as it was.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise UnknownModel(f"unknown model {name!r}; available: {', '.join(available_models())}")
    if num_classes < 2 or in_channels < 1 or image_size < 8:
        raise ValueError(
            f"need num_classes >= 2, in_channels >= 1, image_size >= 8; got "
            f"{num_classes}, {in_channels}, {image_size}"
        )
    small = image_size <= SMALL_IMAGE_MAX
    if seed is None:
        return builder(num_classes, in_channels, small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(num_classes, in_channels, small)


def batchnorm_prefixes(model: nn.Module) -> set[str]:
    """Module names of the BatchNorm layers, e.g. `"layer1.0.bn1"` (what FedBN keeps local)."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


def default_input(*, in_channels: int, image_size: int, batch_size: int = 2) -> torch.Tensor:
    """A zero batch of the model's input shape (shape checks, tracing, warm-up)."""
    return torch.zeros(batch_size, in_channels, image_size, image_size)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

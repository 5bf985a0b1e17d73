"""The classifier: a torchvision video ResNet (r3d_18, mc3_18, r2plus1d_18) adapted to MRI.

A Kinetics-400 video network sees a clip as (channels, time, height, width); a volume of
shape (1, x, y, z) goes in the same way, its first axis playing the part of time. The
adaptation (dissertation section 4.4-4.5):

- the first convolution takes one channel; its kernels are the pretrained RGB kernels
  summed over the colour axis, so a grey clip (R = G = B = v) gives the same response as
  before (kept as the features the later layers expect, rather than random);
- the final fully connected layer is new, with ``num_classes`` outputs;
- the stem and layer1-3 are frozen, layer4 and fc are trained (``trainable_from``).

Frozen BatchNorm layers stay in eval mode while training (``train_mode``): in train mode
they would keep overwriting their running statistics with those of batches of two MRI
volumes, so the "frozen" layers would change after all, and noisily.

Two more models share these rules (one channel made from summed RGB kernels, a new head,
freezing by stage):

- ``mvit_v2_s`` (Kinetics-400 MViT-V2-S), which only accepts 16x224x224 clips: the volume is
  resampled trilinearly to 16 frames along its first axis and 224x224 in-plane
  (``VolumeMViT``). Its stages are the groups of blocks of one width (96, 192, 384, 768
  channels); "layer4" is the last of them plus the final norm.
- ``resnet50`` on 2D slices (``SliceResNet``, the 2D baseline): ``n_slices`` slices of one
  plane around the volume's centre go through an ImageNet ResNet-50 as a batch of images
  (grey intensities in [0, 1] normalised with ImageNet's statistics averaged over colour);
  the scan's class probabilities are the mean of its slices' (the module returns their
  logarithm, so softmax and cross-entropy work on it unchanged). Head 2048 -> 512 -> ReLU ->
  Dropout 0.5 -> classes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from workflow_scripts.common import cli

LOG = logging.getLogger(__name__)

VIDEO_RESNETS = ("r3d_18", "mc3_18", "r2plus1d_18")
VIDEO_ARCHS = VIDEO_RESNETS + ("mvit_v2_s",)
ARCHS = VIDEO_ARCHS + ("resnet50",)
# Every model's stages, input to output: freezing and the head's learning rate work on these.
BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis a plane's slices are taken across
# ImageNet's normalisation, averaged over the colour channels, for grey slices (torchvision's presets).
IMAGENET_GREY_MEAN = sum((0.485, 0.456, 0.406)) / 3
IMAGENET_GREY_STD = sum((0.229, 0.224, 0.225)) / 3
MVIT_CLIP = (16, 224, 224)  # frames, height, width: the only input size MViT-V2-S accepts


def _weights_enum(arch: str):
    """The torchvision weights enum of ``arch`` (its KINETICS400_V1 member is the pretrained file)."""
    from torchvision.models import get_model_weights

    return get_model_weights(arch)


def pretrained_cache_path(arch: str, *, weights: str) -> Path:
    """Where torchvision keeps (and looks for) the pretrained weights of ``arch``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_pretrained_enum(arch, weights).url)


def missing_weights_message(arch: str, weights: str, err: BaseException) -> str:
    url = _pretrained_enum(arch, weights).url
    return (f"cannot load the {weights} weights of {arch} ({err}); torchvision reads them from "
            f"{pretrained_cache_path(arch, weights=weights)} and downloads them there when missing: copy the file from "
            f"{url} to that path (set TORCH_HOME to choose the cache folder), or set the experiment's weights to "
            "a local state-dict file or to none")


def _pretrained_enum(arch: str, weights: str):
    """The torchvision weights of ``arch`` named by ``weights`` (kinetics400 for video models,
    imagenet for resnet50), with an error naming what each architecture accepts."""
    if weights == "kinetics400" and arch in VIDEO_ARCHS:
        return _weights_enum(arch).KINETICS400_V1
    if weights == "imagenet" and arch == "resnet50":
        return _weights_enum(arch).IMAGENET1K_V1
    accepted = "kinetics400" if arch in VIDEO_ARCHS else "imagenet"
    raise cli.PipelineError(f"{arch} has no {weights} weights in torchvision; use {accepted}, none, or a "
                            "state-dict file")


def fetch_pretrained_weights(arch: str, *, weights: str) -> dict[str, object]:
    """Download the pretrained weights of ``arch`` into torch's cache once (torchvision checks the
    SHA-256 prefix in the file name) and return a record of them; the workflow runs this on the
    submitting host, because cluster compute nodes often have no network."""
    if arch not in ARCHS:
        raise cli.PipelineError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    enum = _pretrained_enum(arch, weights)
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        raise cli.PipelineError(missing_weights_message(arch, weights, err)) from err
    path = pretrained_cache_path(arch, weights=weights)
    return {"arch": arch, "weights": f"{type(enum).__name__}.{enum.name}", "url": enum.url, "path": str(path),
            "bytes": path.stat().st_size, "tensors": len(state)}


def _base_model(arch: str, weights: str) -> nn.Module:
    """The unmodified torchvision model (3 channels, 400 or 1000 classes) with the requested weights."""
    from torchvision.models import get_model

    if arch not in ARCHS:
        raise cli.PipelineError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if weights == "none":
        return get_model(arch, weights=None)
    if weights in ("kinetics400", "imagenet"):
        enum = _pretrained_enum(arch, weights)
        try:
            return get_model(arch, weights=enum)
        except Exception as err:  # no network, or a truncated file in the cache
            raise cli.PipelineError(missing_weights_message(arch, weights, err)) from err
    path = Path(weights)
    if not path.is_file():
        raise cli.PipelineError(f"weights must be 'kinetics400' (video), 'imagenet' (resnet50), 'none' or a "
                                f"state-dict file; {path} does not exist")
    model = get_model(arch, weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:
        raise cli.PipelineError(f"{path} is not a torchvision {arch} state dict (3 input channels, "
                                f"{'1000' if arch == 'resnet50' else '400'} classes): {err}") from err
    return model


def _adapt_first_conv(conv: nn.Conv2d | nn.Conv3d, in_channels: int) -> nn.Conv2d | nn.Conv3d:
    """A copy of ``conv`` taking ``in_channels``: RGB kernels summed over colour, shared equally.

    With one channel the new kernel is the plain sum, so the response to a grey clip is kept.
    """
    if in_channels == conv.in_channels:
        return conv
    new = type(conv)(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, *([1] * (summed.dim() - 2))) / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class VolumeMViT(nn.Module):
    """torchvision's MViT-V2-S on a volume: (B, C, x, y, z) resampled trilinearly to the 16x224x224
    clip it accepts, x becoming the 16 frames (as x is the time axis of the video ResNets)."""

    def __init__(self, net: nn.Module, clip: tuple[int, int, int] = MVIT_CLIP):
        super().__init__()
        self.net, self.clip = net, tuple(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.clip:
            x = nn.functional.interpolate(x, size=self.clip, mode="trilinear", align_corners=False)
        return self.net(x)


class SliceResNet(nn.Module):
    """A 2D ResNet-50 on ``n_slices`` slices of one plane, ``spacing`` voxels apart around the centre;
    returns the log of the mean of the slices' class probabilities (a scan-level log-probability)."""

    def __init__(self, net: nn.Module, num_classes: int = 2, *, plane: str, n_slices: int, spacing: int):
        super().__init__()
        if plane not in PLANES:
            raise cli.PipelineError(f"plane must be one of {', '.join(PLANES)}, not {plane!r}")
        if n_slices < 1 or spacing < 1:
            raise cli.PipelineError(f"n_slices and slice spacing must be at least 1, got {n_slices} and {spacing}")
        self.plane, self.n_slices, self.spacing = plane, n_slices, spacing
        self.stem = nn.Sequential(_adapt_first_conv(net.conv1, 1), net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.pool = net.avgpool
        self.fc = nn.Sequential(nn.Linear(net.fc.in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                nn.Linear(512, num_classes))

    def slice_indices(self, length: int) -> list[int]:
        """The slices taken along an axis of ``length`` voxels: centred, ``spacing`` apart, inside the volume."""
        first = length // 2 - (self.n_slices - 1) * self.spacing // 2
        return [min(max(first + i * self.spacing, 0), length - 1) for i in range(self.n_slices)]

    def slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, x, y, z) -> (B * n_slices, 1, H, W), ImageNet-normalised."""
        axis = 2 + PLANES[self.plane]
        index = torch.tensor(self.slice_indices(x.shape[axis]), device=x.device)
        taken = x.index_select(axis, index).movedim(axis, 1)  # (B, n, 1, H, W)
        images = taken.reshape(-1, *taken.shape[2:])
        return (images - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(self.slices(x))))))
        logits = self.fc(torch.flatten(self.pool(h), 1)).float()
        probs = torch.softmax(logits, dim=1).reshape(n, self.n_slices, -1).mean(dim=1)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


# MViT-V2-S blocks by the width they take: 96, 192, 384, 768 channels are layer1..layer4.
_MVIT_STAGE_BY_WIDTH = {96: "layer1", 192: "layer2", 384: "layer3", 768: "layer4"}


def stage_of(model: nn.Module, parameter_name: str) -> str:
    """The stage (one of BLOCKS) a parameter belongs to, for every model this module builds."""
    if isinstance(model, VolumeMViT):
        name = parameter_name.removeprefix("net.")
        top = name.split(".")[0]
        if top in ("conv_proj", "pos_encoding"):
            return "stem"
        if top == "blocks":
            block = model.net.blocks[int(name.split(".")[1])]
            return _MVIT_STAGE_BY_WIDTH[block.norm1.normalized_shape[0]]
        return {"norm": "layer4", "head": "fc"}[top]
    return parameter_name.split(".")[0]


def freeze_before(model: nn.Module, *, trainable_from: str) -> None:
    """Freeze every stage before ``trainable_from``; train it and the rest."""
    if trainable_from not in BLOCKS:
        raise cli.PipelineError(f"trainable_from must be one of {', '.join(BLOCKS)}, not {trainable_from!r}")
    first = BLOCKS.index(trainable_from)
    for name, param in model.named_parameters():
        param.requires_grad_(BLOCKS.index(stage_of(model, name)) >= first)


def unfreeze_from(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """Make ``stage`` and every later stage trainable (phased unfreezing); returns the newly trained parameters."""
    if stage not in BLOCKS:
        raise cli.PipelineError(f"unfreeze stage must be one of {', '.join(BLOCKS)}, not {stage!r}")
    first = BLOCKS.index(stage)
    new = [p for name, p in model.named_parameters()
           if BLOCKS.index(stage_of(model, name)) >= first and not p.requires_grad]
    for param in new:
        param.requires_grad_(True)
    return new


def build_model(*, arch: str, weights: str, num_classes: int = 2, in_channels: int = 1, trainable_from: str,
                plane: str, n_slices: int, slice_spacing: int) -> nn.Module:
    """The network of ``arch`` with ``weights`` ('kinetics400', 'imagenet', 'none' or a torchvision
    state-dict file), an ``in_channels`` stem made from the RGB kernels, a new ``num_classes`` head,
    and its stages before ``trainable_from`` frozen. ``plane``, ``n_slices`` and ``slice_spacing``
    set the slices the 2D resnet50 sees. Every setting is the caller's: the experiment's resolved settings
    (experiments.<name>, defaults in schemas/config.schema.yaml)."""
    base = _base_model(arch, str(weights))
    if arch == "resnet50":
        if in_channels != 1:
            raise cli.PipelineError("the 2D baseline takes one-channel slices")
        model = SliceResNet(base, num_classes, plane=plane, n_slices=n_slices, spacing=slice_spacing)
    elif arch == "mvit_v2_s":
        base.conv_proj = _adapt_first_conv(base.conv_proj, in_channels)
        base.head[-1] = nn.Linear(base.head[-1].in_features, num_classes)
        model = VolumeMViT(base)
    else:
        base.stem[0] = _adapt_first_conv(base.stem[0], in_channels)
        base.fc = nn.Linear(base.fc.in_features, num_classes)
        model = base
    freeze_before(model, trainable_from=trainable_from)
    LOG.info("%s: weights %s, %d input channel(s), %d classes, trained from %s", arch, weights, in_channels,
             num_classes, trainable_from)
    return model


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except BatchNorm layers whose parameters are all frozen stay in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> int:
    """Recompute the running statistics of the trained BatchNorm layers as the exact average over
    ``batches`` (training scans, no augmentation); frozen, pretrained ones keep theirs.

    Trained from random weights with batches of two, the running averages lag behind the
    weights, and eval-mode predictions can all fall in one class although their ranking is good.
    Returns the number of layers recalibrated.
    """
    trained = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and any(p.requires_grad for p in m.parameters())]
    if not trained:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in trained]
    for layer in trained:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over every batch
        layer.train()
    for x in batches:
        model(x.to(device))
    for layer, momentum in zip(trained, momenta):
        layer.momentum = momentum
    if was_training:
        train_mode(model)
    else:
        model.eval()
    return len(trained)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and frozen parameter counts (the numbers the dissertation reports)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def parameter_groups(model: nn.Module, *, lr_head: float, lr_backbone: float) -> list[dict]:
    """Optimizer groups: the new head at ``lr_head``, the trainable pretrained layers at ``lr_backbone``.

    Named "head" and "backbone" so learning rates can be logged by name; an empty group is left out.
    """
    named = [(stage_of(model, name), p) for name, p in model.named_parameters() if p.requires_grad]
    head = [p for stage, p in named if stage == "fc"]
    backbone = [p for stage, p in named if stage != "fc"]
    groups = [{"name": "head", "params": head, "lr": lr_head},
              {"name": "backbone", "params": backbone, "lr": lr_backbone}]
    return [g for g in groups if g["params"]]


def main(argv=None) -> None:
    import argparse
    import json

    from workflow_scripts.common.nifti_io import write_text_atomic

    p = argparse.ArgumentParser(description="Fetch a model's pretrained weights into torch's cache.")
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download once (hash-checked) and write a record of the file")
    fetch.add_argument("--arch", required=True, choices=ARCHS)
    fetch.add_argument("--weights", required=True, choices=["kinetics400", "imagenet"],
                       help="the experiment's weights (kinetics400 for the video models, imagenet for resnet50)")
    fetch.add_argument("--record", required=True, help="JSON file recording the weights file used")
    args = p.parse_args(argv)
    record = fetch_pretrained_weights(args.arch, weights=args.weights)
    write_text_atomic(json.dumps(record, indent=2) + "\n", args.record)
    LOG.info("%s weights of %s: %s (%d bytes)", args.weights, args.arch, record["path"], record["bytes"])


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

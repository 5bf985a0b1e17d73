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
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from workflow_scripts import cli

LOG = logging.getLogger(__name__)

ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")
# The torchvision video ResNets' top-level blocks, input to output.
BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


def _weights_enum(arch: str):
    """The torchvision weights enum of ``arch`` (its KINETICS400_V1 member is the pretrained file)."""
    from torchvision.models import get_model_weights

    return get_model_weights(arch)


def kinetics_cache_path(arch: str) -> Path:
    """Where torchvision keeps (and looks for) the Kinetics-400 weights of ``arch``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_weights_enum(arch).KINETICS400_V1.url)


def missing_weights_message(arch: str, err: BaseException) -> str:
    url = _weights_enum(arch).KINETICS400_V1.url
    return (f"cannot load the Kinetics-400 weights of {arch} ({err}); torchvision reads them from "
            f"{kinetics_cache_path(arch)} and downloads them there when missing: copy the file from {url} to "
            "that path (set TORCH_HOME to choose the cache folder), or set the experiment's weights to a local "
            "state-dict file or to none")


def fetch_kinetics_weights(arch: str) -> dict[str, object]:
    """Download the Kinetics-400 weights of ``arch`` into torch's cache once (torchvision checks the
    SHA-256 prefix in the file name) and return a record of them; the workflow runs this on the
    submitting host, because cluster compute nodes often have no network."""
    if arch not in ARCHS:
        raise cli.PipelineError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    enum = _weights_enum(arch).KINETICS400_V1
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        raise cli.PipelineError(missing_weights_message(arch, err)) from err
    path = kinetics_cache_path(arch)
    return {"arch": arch, "weights": f"{type(enum).__name__}.{enum.name}", "url": enum.url, "path": str(path),
            "bytes": path.stat().st_size, "tensors": len(state)}


def _base_model(arch: str, weights: str) -> nn.Module:
    """The unmodified torchvision model (3 channels, 400 classes) with the requested weights."""
    from torchvision.models import get_model

    if arch not in ARCHS:
        raise cli.PipelineError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if weights == "none":
        return get_model(arch, weights=None)
    if weights == "kinetics400":
        enum = _weights_enum(arch).KINETICS400_V1
        try:
            return get_model(arch, weights=enum)
        except Exception as err:  # no network, or a truncated file in the cache
            raise cli.PipelineError(missing_weights_message(arch, err)) from err
    path = Path(weights)
    if not path.is_file():
        raise cli.PipelineError(f"weights must be 'kinetics400', 'none' or a state-dict file; {path} does not exist")
    model = get_model(arch, weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:
        raise cli.PipelineError(f"{path} is not a torchvision {arch} state dict (3 input channels, 400 classes): "
                                f"{err}") from err
    return model


def _adapt_first_conv(conv: nn.Conv3d, in_channels: int) -> nn.Conv3d:
    """A copy of ``conv`` taking ``in_channels``: RGB kernels summed over colour, shared equally.

    With one channel the new kernel is the plain sum, so the response to a grey clip is kept.
    """
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv3d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, 1, 1, 1) / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def freeze_before(model: nn.Module, trainable_from: str = "layer4") -> None:
    """Freeze every top-level block before ``trainable_from``; train it and the rest."""
    if trainable_from not in BLOCKS:
        raise cli.PipelineError(f"trainable_from must be one of {', '.join(BLOCKS)}, not {trainable_from!r}")
    first = BLOCKS.index(trainable_from)
    for index, name in enumerate(BLOCKS):
        for param in getattr(model, name).parameters():
            param.requires_grad_(index >= first)


def build_model(arch: str = "r3d_18", weights: str = "kinetics400", num_classes: int = 2, in_channels: int = 1,
                trainable_from: str = "layer4") -> nn.Module:
    """A video ResNet with ``weights`` ('kinetics400', 'none' or a torchvision state-dict file),
    an ``in_channels`` stem made from the RGB kernels, a new ``num_classes`` head, and frozen early blocks."""
    model = _base_model(arch, str(weights))
    model.stem[0] = _adapt_first_conv(model.stem[0], in_channels)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    freeze_before(model, trainable_from)
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


def parameter_groups(model: nn.Module, lr_head: float = 1e-3, lr_backbone: float = 1e-4) -> list[dict]:
    """Optimizer groups: the new head at ``lr_head``, the trainable pretrained layers at ``lr_backbone``.

    Named "head" and "backbone" so learning rates can be logged by name; an empty group is left out.
    """
    head = [p for p in model.fc.parameters() if p.requires_grad]
    head_ids = {id(p) for p in model.fc.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"name": "head", "params": head, "lr": lr_head},
              {"name": "backbone", "params": backbone, "lr": lr_backbone}]
    return [g for g in groups if g["params"]]


def main(argv=None) -> None:
    import argparse
    import json

    from workflow_scripts.nifti_io import write_text_atomic

    p = argparse.ArgumentParser(description="Fetch a video model's Kinetics-400 weights into torch's cache.")
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download once (hash-checked) and write a record of the file")
    fetch.add_argument("--arch", required=True, choices=ARCHS)
    fetch.add_argument("--record", required=True, help="JSON file recording the weights file used")
    args = p.parse_args(argv)
    record = fetch_kinetics_weights(args.arch)
    write_text_atomic(json.dumps(record, indent=2) + "\n", args.record)
    LOG.info("Kinetics-400 weights of %s: %s (%d bytes)", args.arch, record["path"], record["bytes"])


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

"""Seconds per explanation map of workflow_scripts.explain.explain: Grad-CAM, and occlusion with several
perturbations per forward pass (`explain.occlusion_batch`, captum's `perturbations_per_eval`).

Times the workflow's own functions on one volume and network (random weights: the cost does not
depend on them), on the CPU or a GPU; 1 is one occluded input per pass (the unbatched way):

    python benchmarks/explain_speed.py --size 128 --patch 32 --stride 32 --batch 1 4 8 [--device cuda]

The explain job makes each map twice per scan and method (the trained network and its randomised
copy for the sanity check); a predict scan with `explain: [gradcam]` makes one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(function, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (the model is warmed up once before, in main)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[len(seconds) // 2]


def main() -> None:
    from workflow_scripts.common.settings import resolve
    from workflow_scripts.explain.explain import gradcam_map, occlusion_map
    from workflow_scripts.learning.models import build_model
    from workflow_scripts.learning.recipe import training_settings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="r3d_18")
    p.add_argument("--size", type=int, default=128, help="cubic input edge (voxels)")
    p.add_argument("--patch", type=int, default=32, help="explain.occlusion_patch")
    p.add_argument("--stride", type=int, default=32, help="explain.occlusion_stride")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="explain.occlusion_batch values")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    gradcam_layer = resolve("explain").gradcam_layer  # the schema's (default)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(**training_settings(None, {"arch": args.arch, "weights": "none"}).model).to(device).eval()
    x = torch.randn(1, 1, args.size, args.size, args.size, device=device)
    occlusions = len(range(0, args.size - args.patch + 1, args.stride)) ** 3
    with torch.no_grad():  # warm-up: one pass at the largest batch size
        model(x.expand(max(args.batch), -1, -1, -1, -1))
    rows = [{"method": "gradcam (layer4)", "forward passes": 1, "seconds per map": timed(
        lambda: gradcam_map(model, x, 1, layer=gradcam_layer), args.repeats)}]
    for batch in args.batch:
        seconds = timed(lambda: occlusion_map(model, x, 1, patch=args.patch, stride=args.stride, batch=batch),
                        args.repeats)
        rows.append({"method": f"occlusion, batch {batch}", "forward passes": 1 + -(-occlusions // batch),
                     "seconds per map": seconds})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.machine()}, {args.threads} threads"
    print(f"{args.arch} at {args.size}^3, occlusion {args.patch}^3 cubes, stride {args.stride} "
          f"({occlusions} occlusions), {device_name}")
    print("| method | forward passes | s per map |\n| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['method']} | {row['forward passes']} | {row['seconds per map']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "arch": args.arch, "size": args.size,
                                         "patch": args.patch, "stride": args.stride, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Stage 2, stripped: skull stripping with SynthStrip (default) or deepbet.

SynthStrip is FreeSurfer's network as packaged by ``nipreps-synthstrip``; its official
weights ``synthstrip.1.pt`` are fetched once into a cache (SHA-256 checked) or read from a
configured path. deepbet ships its weights inside its wheel, so it works offline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from workflow_scripts.common import cli, settings
from workflow_scripts.common.nifti_io import (clean_image, describe_volume, extend_provenance, load_nifti, provenance_of,
                                       save_nifti_atomic, write_text_atomic)
from workflow_scripts.preprocess.qc_metrics import bound_violation
from workflow_scripts.common.scan_failure import ScanDataError, run_stage

LOG = logging.getLogger(__name__)

METHODS = ("synthstrip", "deepbet")
GPU_DEVICES = {False: "cpu", "auto": "auto", True: "gpu"}  # preprocess.skullstrip.gpu -> where the network runs
# The config sections a skull-strip job reads (its --settings).
SETTINGS = ("preprocess.skullstrip", "qc.thresholds.brain_volume_ml")
SYNTHSTRIP_FILENAME = "synthstrip.1.pt"
SYNTHSTRIP_BYTES = 30_851_709
SYNTHSTRIP_SHA256 = "37417f802196186441aae3e7f385d94f8a98c64a88acaeaa2723af995c653e33"
# What deepbet raises when it finds no brain at all: it keeps the
# largest connected component by taking the argmax of an empty count. The scan's failure, not a bug.
NO_BRAIN = "argmax of an empty sequence"
SYNTHSTRIP_URLS = (
    "https://surfer.nmr.mgh.harvard.edu/docs/synthstrip/requirements/synthstrip.1.pt",
    "https://surfer.nmr.mgh.harvard.edu/pub/dist/freesurfer/synthstrip/models/synthstrip.1.pt",
)


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remedies(cache_file: Path) -> str:
    return (f"Two remedies: (1) download {SYNTHSTRIP_FILENAME} (SHA-256 {SYNTHSTRIP_SHA256}) from "
            f"{SYNTHSTRIP_URLS[0]} on a machine with network access and set "
            f"preprocess.skullstrip.synthstrip_weights to its path (or copy it to {cache_file}); "
            f"(2) set preprocess.skullstrip.method: deepbet, which ships its weights and works offline.")


def fetch_synthstrip_weights(cache_dir: str | Path, urls: Sequence[str] = SYNTHSTRIP_URLS,
                             sha256: str = SYNTHSTRIP_SHA256, timeout: float = 60.0) -> Path:
    """Download the weights once into ``cache_dir``; a file whose checksum differs is never kept."""
    cache_file = Path(cache_dir) / SYNTHSTRIP_FILENAME
    if cache_file.exists():
        if sha256_of(cache_file) == sha256:
            return cache_file
        raise cli.PipelineError(f"{cache_file} is not the official {SYNTHSTRIP_FILENAME} (SHA-256 mismatch); "
                                f"delete it and re-run, or point preprocess.skullstrip.synthstrip_weights "
                                f"at a good copy. " + _remedies(cache_file))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(prefix=".synthstrip.", dir=cache_file.parent)
        os.close(fd)
        try:
            LOG.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            got = sha256_of(tmp)
            if got != sha256:
                errors.append(f"{url}: SHA-256 {got} differs from the expected {sha256}")
                continue
            os.replace(tmp, cache_file)
            LOG.info("SynthStrip weights cached at %s", cache_file)
            return cache_file
        except OSError as err:  # URLError, timeouts and HTTP errors are OSErrors
            errors.append(f"{url}: {err}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise cli.PipelineError("cannot download the SynthStrip weights (" + "; ".join(errors) + "). "
                            + _remedies(cache_file))


def resolve_synthstrip_weights(configured: str | None, cache_dir: str | Path) -> Path:
    """The weights file to use: the configured path, else the verified cached download."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise cli.PipelineError(f"preprocess.skullstrip.synthstrip_weights={configured} does not exist. "
                                    + _remedies(Path(cache_dir) / SYNTHSTRIP_FILENAME))
        return path
    cache_file = Path(cache_dir) / SYNTHSTRIP_FILENAME
    if not cache_file.is_file():
        raise cli.PipelineError(f"no SynthStrip weights at {cache_file}. " + _remedies(cache_file))
    return cache_file


def synthstrip_grid(img: nib.Nifti1Image) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the 1 mm grid SynthStrip runs its network on: ``nipreps.synthstrip.cli.conform``'s
    grid (LIA axes, each side the head's extent rounded up to a multiple of 64 within 192-320 voxels, centred
    on the image), computed here without its resampling."""
    shape = np.array(img.shape[:3])
    corners = np.array([(i, j, k) for k in (0, shape[2] - 1) for j in (0, shape[1] - 1)
                        for i in (0, shape[0] - 1)]) + 0.5
    corners_xyz = img.affine @ np.hstack((corners, np.ones((len(corners), 1)))).T
    affine = np.diag([-1.0, 1.0, -1.0, 1.0])[:, (0, 2, 1, 3)]
    extent = corners_xyz.min(1)[:3], corners_xyz.max(1)[:3]
    target = ((extent[1] - extent[0]) / 1.0 + 0.999).astype(int)
    target = np.clip(np.ceil(np.array(target) / 64).astype(int) * 64, 192, 320)
    target[2], target[1] = target[1:3]
    centre_in = img.affine @ np.hstack((0.5 * (shape - 1), 1.0))
    centre_target = affine @ np.hstack((0.5 * (target - 1), 1.0))
    affine[:3, 3] -= centre_target[:3] - centre_in[:3]
    return tuple(int(n) for n in target), affine


def resample_spline(data: np.ndarray, source_affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                    *, cval: float = 0.0, threads: int = 1) -> np.ndarray:
    """Cubic-spline values of ``data`` at the voxel centres of another grid (identity transform, constant
    ``cval`` outside), as nitransforms' ``apply`` gives them, with scipy's ``affine_transform`` in slabs on
    ``threads`` threads instead of an explicit coordinate list (a third of the time on a 256^3 grid)."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    voxel_map = np.linalg.inv(source_affine) @ target_affine
    matrix, offset = voxel_map[:3, :3], voxel_map[:3, 3]
    out = np.empty(tuple(shape), data.dtype)
    bounds = np.linspace(0, shape[0], max(1, threads) + 1).astype(int)

    def slab(lo: int, hi: int) -> None:
        ndimage.affine_transform(data, matrix, offset=offset + matrix[:, 0] * lo, output_shape=(hi - lo, *shape[1:]),
                                 output=out[lo:hi], order=3, mode="constant", cval=cval, prefilter=True)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(slab, bounds[:-1], bounds[1:]))
    return out


def synthstrip_mask(img: nib.Nifti1Image, weights: str | Path, *, threads: int = 1, border: int,
                    gpu: bool) -> np.ndarray:
    """Brain mask from SynthStrip: nipreps' network and weights, and the steps of its command line (conform
    to its 1 mm grid, scale to the 99th percentile, signed distance back on the image's grid, keep the
    largest component within ``border`` mm, fill holes), run in this process."""
    import torch
    from nipreps.synthstrip.model import StripModel
    from scipy import ndimage

    torch.set_num_threads(max(1, threads))
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    model = StripModel()
    checkpoint = torch.load(weights, map_location=device)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.to(device).eval()

    data = np.asanyarray(img.dataobj)
    data = data.astype(f"{data.dtype.kind}{min(8, data.dtype.itemsize)}", copy=False)  # nitransforms' cap_dtype
    shape, conformed_affine = synthstrip_grid(img)
    conformed = resample_spline(data, img.affine, shape, conformed_affine, threads=threads).astype(np.float32)
    conformed -= conformed.min()
    conformed = np.clip(conformed / np.percentile(conformed, 99), 0, 1)
    with torch.no_grad():
        sdt = model(torch.from_numpy(conformed[np.newaxis, np.newaxis]).to(device)).cpu().numpy().squeeze()
    distance = resample_spline(sdt.astype(np.float32), conformed_affine, img.shape[:3], img.affine, cval=100,
                               threads=threads).astype(np.int16)  # upstream reads the distance as int16
    components = ndimage.label(distance < border)[0]
    sizes = np.bincount(components.ravel())[1:]
    if not sizes.size:
        raise ScanDataError("empty_brain_mask", "SynthStrip found no brain in the image (no voxel inside its "
                                                "distance border)")
    return ndimage.binary_fill_holes(components == np.argmax(sizes) + 1)


def deepbet_mask(img: nib.Nifti1Image, *, threshold: float, n_dilate: int, gpu: bool,
                 extractor=None) -> np.ndarray:
    """Brain mask from deepbet (weights inside its wheel); ``extractor``: a ``BrainExtraction`` already
    loaded, for a caller that strips many scans in one process."""
    if extractor is None:
        from deepbet import BrainExtraction

        extractor = BrainExtraction(no_gpu=not gpu)
    float_img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    try:
        _, mask, _ = extractor.run(float_img, threshold=threshold, n_dilate=n_dilate)
    except ValueError as err:
        if NO_BRAIN in str(err):
            raise ScanDataError("empty_brain_mask", "deepbet found no brain in the image") from err
        raise
    return np.asanyarray(mask.dataobj) > 0


def brain_volume_ml(mask: np.ndarray, img: nib.Nifti1Image) -> float:
    """Volume of a mask on ``img``'s grid in millilitres."""
    return float(np.count_nonzero(mask) * np.prod(img.header.get_zooms()[:3]) / 1000)


def check_mask(mask: np.ndarray, img: nib.Nifti1Image, method: str,
               volume_bounds_ml: Sequence[float | None] | None = None) -> float:
    """The mask's volume in mL; an empty mask, or one outside the plausible volume of a human brain, is the
    scan's failure (a series that is not a head, or a failed stripping), not a bug."""
    if mask.shape != img.shape[:3]:
        raise cli.PipelineError(f"{method} returned a mask of shape {mask.shape} for an image of shape {img.shape}")
    if not mask.any():
        raise ScanDataError("empty_brain_mask", f"{method} found no brain in the image (empty mask)")
    volume = brain_volume_ml(mask, img)
    violation = bound_violation(volume, *volume_bounds_ml) if volume_bounds_ml is not None else None
    if violation:
        raise ScanDataError("implausible_brain_mask",
                            f"{method}'s brain mask is {violation} mL (qc.thresholds.brain_volume_ml): not a head, "
                            f"or a failed stripping")
    return volume


def strip(img: nib.Nifti1Image, mask: np.ndarray, method: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The brain image (zero outside the mask) and the mask, both tagged with the method."""
    provenance = extend_provenance(provenance_of(img), method)
    data = np.asanyarray(img.dataobj)
    brain = np.where(mask, data, 0).astype(data.dtype)
    return (clean_image(brain, img.affine, provenance),
            clean_image(mask.astype(np.uint8), img.affine, provenance, dtype=np.uint8))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="skull-stripped image")
    p.add_argument("--mask", required=True, help="brain mask")
    p.add_argument("--sidecar", required=True, help="JSON record of the method and weights")
    p.add_argument("--synthstrip-weights", help="weights file (synthstrip)")
    settings.add_argument(p, *SETTINGS)  # the method and its settings; the brain volume bound (null: none)
    args = p.parse_args(argv)
    cli.limit_threads(args.threads)
    strip_settings, bounds = settings.read_job(args.settings, *SETTINGS)
    run_stage("stripped", [args.input], [args.output, args.mask, args.sidecar],
              lambda: strip_scan(args, strip_settings, bounds))


def command_settings(skullstrip: Mapping[str, Any], brain_volume_ml: Sequence | None) -> str:
    """The --settings JSON of a skull-strip job: the method with only its own settings, and the brain volume
    bound. Download addresses, the weights' cache and the other method's settings are left out, so changing
    them re-runs no scan (the weights file itself is the job's input)."""
    own = {"synthstrip": ("synthstrip_border",), "deepbet": ("deepbet_threshold", "deepbet_dilate")}
    keys = ("method", "gpu", *own[skullstrip["method"]])
    return json.dumps({SETTINGS[0]: {key: skullstrip[key] for key in keys}, SETTINGS[1]: brain_volume_ml},
                      sort_keys=True)


def use_gpu(device: str) -> bool:
    """Whether the network runs on a GPU under preprocess.skullstrip.gpu (false / auto / true as cpu / auto / gpu)."""
    if device == "cpu":
        return False
    import torch

    present = torch.cuda.is_available()
    if device == "gpu" and not present:
        raise cli.PipelineError(f"preprocess.skullstrip.gpu is true but torch sees no CUDA GPU on {platform.node()}; "
                                f"set it to auto (the GPU where there is one, else the CPU) or false")
    return present


def strip_scan(args: argparse.Namespace, strip_settings: settings.Settings, bounds: Sequence | None) -> None:
    """Skull-strip one scan with preprocess.skullstrip's settings; writes the image, mask and sidecar."""
    method = strip_settings.method
    record = {"method": method}
    if method == "synthstrip":
        weights = Path(args.synthstrip_weights or "")
        if not weights.is_file():  # checked before any work
            raise cli.PipelineError(f"no SynthStrip weights at '{args.synthstrip_weights}'. "
                                    + _remedies(weights))
        digest = sha256_of(weights)
        record.update(weights=weights.name, weights_sha256=digest, official_weights=digest == SYNTHSTRIP_SHA256)
        if digest != SYNTHSTRIP_SHA256:
            LOG.warning("%s is not the official %s (SHA-256 %s); using it as configured",
                        weights, SYNTHSTRIP_FILENAME, digest)
    gpu = use_gpu(GPU_DEVICES[strip_settings.gpu])
    img = load_nifti(args.input)
    started = time.perf_counter()
    LOG.info("%s on %s: %s, %d threads, on the %s", method, args.input, describe_volume(img), args.threads,
             "GPU" if gpu else "CPU")
    if method == "synthstrip":
        mask = synthstrip_mask(img, weights, threads=args.threads, border=strip_settings.synthstrip_border, gpu=gpu)
        record["border_mm"] = strip_settings.synthstrip_border
    else:
        import deepbet
        import torch
        torch.set_num_threads(args.threads)
        mask = deepbet_mask(img, threshold=strip_settings.deepbet_threshold, n_dilate=strip_settings.deepbet_dilate,
                            gpu=gpu)
        record.update(threshold=strip_settings.deepbet_threshold, n_dilate=strip_settings.deepbet_dilate,
                      deepbet_version=getattr(deepbet, "__version__", _dist_version("deepbet")))
    record["brain_volume_ml"] = round(check_mask(mask, img, method, list(bounds) if bounds else None), 2)
    brain, mask_img = strip(img, mask, method)
    save_nifti_atomic(mask_img, args.mask)
    save_nifti_atomic(brain, args.output)
    write_text_atomic(json.dumps(record, indent=2) + "\n", args.sidecar)
    LOG.info("%s: brain volume %.1f ml in %.1f s", method, record["brain_volume_ml"],
             time.perf_counter() - started)


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def fetch_main(argv: Sequence[str] | None = None) -> None:
    """Command line of the once-per-installation weights download."""
    p = cli.parser("Fetch the official SynthStrip weights into a cache (SHA-256 checked).")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--url", action="append", help="download address (repeatable; default: FreeSurfer's)")
    args = p.parse_args(argv)
    fetch_synthstrip_weights(args.cache_dir, tuple(args.url) if args.url else SYNTHSTRIP_URLS)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fetch":
        raise SystemExit(cli.run(fetch_main, sys.argv[2:]))
    raise SystemExit(cli.run(main))

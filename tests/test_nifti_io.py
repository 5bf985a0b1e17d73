"""Outputs are written atomically and carry nothing but geometry and provenance."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from workflow_scripts.common import nifti_io


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    img = nifti_io.clean_image(np.ones((4, 4, 4), np.float32), np.eye(4), "x")
    target = tmp_path / "out.nii.gz"
    real_save = nib.save

    def crash_midway(image, filename):
        real_save(image, filename)  # the bytes are there ...
        raise KeyboardInterrupt("killed")  # ... when the job is killed

    monkeypatch.setattr(nifti_io.nib, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        nifti_io.save_nifti_atomic(img, target)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_replaced_whole(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    nifti_io.save_nifti_atomic(nifti_io.clean_image(np.zeros((3, 3, 3)), np.eye(4), "a"), target)
    nifti_io.save_nifti_atomic(nifti_io.clean_image(np.ones((5, 5, 5)), np.eye(4), "b"), target)
    back = nib.load(target)
    assert back.shape == (5, 5, 5) and nifti_io.provenance_of(back) == "b"
    assert [p.name for p in target.parent.iterdir()] == ["out.nii.gz"]
    assert target.stat().st_mode & 0o044 == 0o044  # readable by others, not 0600 like mkstemp


def test_clean_image_drops_every_free_text_field_and_extension():
    dirty = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    dirty.header["descrip"] = b"Quixote^Dulcinea 19381107"
    dirty.header["aux_file"] = b"Hospital"
    dirty.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=Quixote"))
    clean = nifti_io.clean_image(np.asanyarray(dirty.dataobj), dirty.affine, "dicom2nifti")
    raw = clean.header.binaryblock + b"".join(e.get_content() for e in clean.header.extensions)
    assert b"Quixote" not in raw and b"Hospital" not in raw and b"19381107" not in raw
    assert nifti_io.provenance_of(clean) == "dicom2nifti"


def test_provenance_is_limited_to_what_nifti_can_hold():
    assert nifti_io.extend_provenance("a>b", "c") == "a>b>c"
    with pytest.raises(ValueError, match="79"):
        nifti_io.extend_provenance("x" * 75, "yyyyyy")

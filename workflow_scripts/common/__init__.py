"""What every stage shares: the command-line frame and its errors (cli), NIfTI reading and atomic
writing (nifti_io), the ANTs bridge, offline mode, failure records of dropped scans (scan_failure),
figure saving (figures) and data files of installed packages (package_data)."""

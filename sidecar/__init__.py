"""pacs-sidecar: DICOM-native similarity search beside a PACS."""

import os as _os

# One BLAS thread unless the admin says otherwise: a query's matrix products are
# small, and extra BLAS threads on a busy host made search ~2.5x slower here
# (bench/query.py). Set before numpy is first imported anywhere in the package.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

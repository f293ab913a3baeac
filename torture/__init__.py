"""The torture harness: campaigns that try to break the promises the README makes.

``python -m torture CAMPAIGN ...`` (``make torture`` runs all of them): each one drives a
real ``sidecar serve`` (``torture.node``) with real DICOM traffic, prints its figures
and exits non-zero on any loss, crash or hang. A short version of each runs in
``make test`` (tests/test_torture.py). See docs/torture.md.
"""

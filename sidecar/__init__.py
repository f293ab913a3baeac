"""pacs-sidecar: DICOM-native similarity search beside a PACS."""

__version__ = "0.1.0"

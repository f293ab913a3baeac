"""The DICOM node: association handling, C-ECHO/C-STORE handlers and durable storage."""

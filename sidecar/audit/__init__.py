"""The DICOM audit trail (PS3.15 A.5 messages, sent by syslog as IHE ATNA asks).

``messages`` renders the XML, ``events`` the sidecar's events (:class:`Auditor`),
``trail`` the queue, the local file and the sender thread, ``syslog`` the
RFC 5424 framing and transports, ``setup`` builds them from the configuration.
Design: docs/design/audit.md.
"""

"""Build the audit trail and the auditor from the configuration (``audit`` section)."""

from __future__ import annotations

import os
import socket
from functools import partial

from sidecar.audit.events import Auditor
from sidecar.audit.messages import Source
from sidecar.audit.syslog import SyslogSender, client_context, frame
from sidecar.audit.trail import AuditTrail, Sink
from sidecar.config import Config


def audit_source(config: Config) -> Source:
    """Who reports: ``audit.source_id`` (default AE@host), the site, our AE title, this process."""
    host = socket.gethostname()
    app = config.audit.syslog.app_name
    return Source(
        source_id=config.audit.source_id or f"{config.dicom.ae_title}@{host}",
        enterprise_site_id=config.audit.enterprise_site_id,
        ae_title=config.dicom.ae_title,
        process=f"{app}[{os.getpid()}]",
        host=host,
    )


def open_trail(config: Config) -> AuditTrail:
    """The audit trail of ``config`` (not started): local file, and the collector when on.

    Raises
    ------
    OSError, ssl.SSLError
        The collector's TLS files cannot be read.
    """
    sys_cfg = config.audit.syslog
    sender = None
    if sys_cfg.enabled:
        tls = (client_context(sys_cfg.ca_certificates, sys_cfg.certificate, sys_cfg.private_key)
               if sys_cfg.protocol == "tls" else None)
        sender = SyslogSender(sys_cfg.protocol, sys_cfg.host, sys_cfg.effective_port,
                              timeout=sys_cfg.timeout, tls=tls)
    framer = partial(frame, hostname=socket.gethostname(), app_name=sys_cfg.app_name,
                     procid=str(os.getpid()))
    return AuditTrail(config.audit_file_path, framer, sender=sender, fsync=config.audit.fsync,
                      queue_size=config.audit.queue_size, retry_seconds=sys_cfg.retry_seconds)


def auditor(config: Config, sink: Sink | None) -> Auditor:
    """An :class:`Auditor` for this process handing its messages to ``sink``."""
    return Auditor(audit_source(config), sink if config.audit.enabled else None,
                   accepted_associations=config.audit.associations == "all")

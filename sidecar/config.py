"""Configuration: one typed schema, loaded from YAML with environment overrides.

The schema below is the single place where every setting, its default and its
help text live. ``config/sidecar.yaml`` mirrors it with comments.

Loading rules
-------------
* Unknown keys are rejected (``extra="forbid"``) at every level.
* ``SIDECAR__SECTION__KEY=value`` overrides ``section.key``; the value is
  parsed as YAML, so ``11113`` is a number, ``true`` a boolean and
  ``[a, b]`` a list.
* Relative paths resolve against the directory of the configuration file
  (or the working directory when there is no file).
* Errors name the dotted path and the offending value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.errors import ConfigError

ENV_PREFIX = "SIDECAR__"
CONFIG_ENV = "SIDECAR_CONFIG"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError("must be 1-16 printable ASCII characters, no backslash")
    return stripped


class _Section(BaseModel):
    # Numbers given for text settings (an AE title "1234" from the environment)
    # stay text.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


#: What a DICOM peer may do: C-STORE to the archive, ordinary C-FIND, similarity
#: C-FIND, C-STORE of example images to ``query.example_ae_title``.
PERMISSIONS: tuple[str, ...] = ("store", "find", "similarity", "example")
Permission = Literal["store", "find", "similarity", "example"]


class PeerConfig(_Section):
    """One calling peer allowed to open associations."""

    ae_title: str = Field(description="Calling AE title of the peer; '*' matches any title.")
    host: str = Field(
        description="IP address or network (CIDR) the peer connects from; '*' matches any host."
    )
    permissions: list[Permission] | None = Field(
        None,
        description="What the peer may do: any of store (C-STORE to the archive), find "
        "(ordinary C-FIND), similarity (similarity C-FIND), example (C-STORE of example "
        "images to query.example_ae_title). An archive PACS needs [store]; a viewer "
        "[find, similarity, example]. [] refuses its associations. Not set: all four, as "
        "before this setting existed (the service says so at start); set it to narrow.",
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return v if v == "*" else _check_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v == "*":
            return v
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError as exc:
            raise ValueError("must be an IP address, a CIDR network or '*'") from exc


class TlsConfig(_Section):
    """DICOM over TLS (PS3.15 Annex B, BCP 195): the DICOM port speaks TLS only."""

    enabled: bool = Field(
        False,
        description="Serve the DICOM port over TLS only (TLS 1.2 or later); plain "
        "associations are then refused.",
    )
    certificate: Path | None = Field(
        None,
        description="PEM file with this node's certificate (then any intermediates). "
        "Relative paths resolve against the configuration file's directory.",
    )
    private_key: Path | None = Field(
        None,
        description="PEM file with the certificate's private key, unencrypted: keep it "
        "readable by the service's user only.",
    )
    ca_certificates: Path | None = Field(
        None,
        description="PEM file of the certificate authorities whose client certificates "
        "are accepted (the PACS's CA).",
    )
    require_client_certificate: bool = Field(
        True,
        description="Peers must present a certificate signed by ca_certificates (mutual "
        "TLS, as for an IHE ATNA secure node). false: clients without a certificate are "
        "served too (encryption without peer authentication; a certificate that is "
        "presented must still chain to ca_certificates when set; allowed_peers still applies).",
    )
    handshake_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to complete the TLS handshake; it runs in the "
        "connection's own thread, so a slow client delays no one else.",
    )

    @model_validator(mode="after")
    def _files_named(self) -> TlsConfig:
        if not self.enabled:
            return self
        missing = [name for name in ("certificate", "private_key") if getattr(self, name) is None]
        if self.require_client_certificate and self.ca_certificates is None:
            missing.append("ca_certificates")
        if missing:
            raise ValueError(
                "TLS is enabled but " + ", ".join(f"dicom.tls.{m}" for m in missing)
                + (" is" if len(missing) == 1 else " are") + " not set"
                + (" (or set require_client_certificate: false)"
                   if missing == ["ca_certificates"] else "")
            )
        return self


class DicomConfig(_Section):
    """The DICOM node (pynetdicom)."""

    ae_title: str = Field(
        "SIDECAR",
        description="Our AE title; the called AE title must match it (or query.example_ae_title).",
    )
    bind_address: str = Field(
        "127.0.0.1",
        description="Address to listen on. The default accepts local connections only; "
        "use 0.0.0.0 and list peers in allowed_peers to serve a PACS on the network.",
    )
    port: int = Field(11112, ge=1, le=65535, description="TCP port to listen on.")
    require_called_ae_title: bool = Field(
        True,
        description="Reject associations whose called AE title is neither ae_title nor "
        "query.example_ae_title.",
    )
    allow_loopback: bool = Field(
        True, description="Accept any calling AE title from a loopback address (127.0.0.0/8, ::1)."
    )
    allowed_peers: list[PeerConfig] = Field(
        default_factory=list,
        description="Calling peers allowed besides loopback: a list of {ae_title, host}. "
        "Empty means no remote peer is accepted.",
    )
    max_associations: int = Field(
        16, ge=1, le=1024, description="Most associations served at once; more are rejected."
    )
    receiver_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes that receive associations on the shared port "
        "(SO_REUSEPORT); 0 means one per CPU core. One Python process uses about "
        "one core, so more processes raise ingest throughput with parallel associations.",
    )
    max_pdu_size: int = Field(
        0,
        ge=0,
        description="Largest P-DATA PDU we accept, in bytes; 0 means unlimited (fastest).",
    )
    acse_timeout: float = Field(30.0, gt=0, description="Seconds to wait for association messages.")
    dimse_timeout: float = Field(60.0, gt=0, description="Seconds to wait for DIMSE messages.")
    network_timeout: float = Field(
        120.0, gt=0, description="Seconds of network silence before an association is aborted."
    )
    tcp_nodelay: bool = Field(
        True, description="Disable Nagle's algorithm on accepted sockets (large speed-up)."
    )
    duplicate_policy: Literal["keep_first", "replace"] = Field(
        "keep_first",
        description="A second copy of a SOP Instance UID with different bytes: keep_first "
        "keeps the stored file (the new copy is acknowledged and dropped), replace stores "
        "the new copy instead. Identical copies are always a no-op.",
    )
    retrieve_ae_title: str = Field(
        "",
        description="RetrieveAETitle put in every C-FIND response: the AE title of the PACS "
        "(its query/retrieve SCP) that holds the studies, so tools retrieve from the system "
        "of record. Empty: our own ae_title (the sidecar serves no C-MOVE/C-GET yet, so set "
        "this when tools honour RetrieveAETitle).",
    )
    max_find_results: int = Field(
        1000,
        ge=0,
        description="Most matches one C-FIND answers; a query matching more is refused "
        "(status 0xA700 with an Error Comment asking to narrow it) rather than silently "
        "truncated. 0 means no limit.",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig)  # type: ignore[arg-type]

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("retrieve_ae_title")
    @classmethod
    def _retrieve_ae(cls, v: str) -> str:
        return _check_ae_title(v) if v.strip() else ""

    @property
    def effective_retrieve_ae_title(self) -> str:
        """RetrieveAETitle of C-FIND responses: ``retrieve_ae_title``, else ``ae_title``."""
        return self.retrieve_ae_title or self.ae_title

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError("must be an IP address such as 127.0.0.1 or 0.0.0.0") from exc
        return v


class FetchConfig(_Section):
    """Where files released by ``storage.keep_files`` are fetched back from (the PACS)."""

    ae_title: str = Field(
        "", description="Called AE title of the PACS to fetch released files back from. Empty: "
        "no fetch-back (re-embedding then waits until the PACS sends the studies again).")
    host: str = Field("", description="The PACS's host name or IP address.")
    port: int = Field(104, ge=1, le=65535, description="The PACS's DICOM port.")
    method: Literal["c-get", "c-move"] = Field(
        "c-get", description="c-get: the files come back on the sidecar's own association "
        "(the PACS must allow C-GET from dicom.ae_title). c-move: the PACS sends them to "
        "move_destination, which it must know as a modality (they arrive through the "
        "receivers, so that peer needs the store permission).")
    move_destination: str = Field(
        "", description="C-MOVE destination AE title. Empty: dicom.ae_title.")
    interval: float = Field(
        120.0, gt=0, description="Seconds between two fetch-back runs (each fetches the series "
        "that wait for their pixels, up to max_series).")
    max_series: int = Field(20, ge=1, description="Most series fetched in one run.")
    timeout: float = Field(60.0, gt=0, description="DIMSE and network timeout (seconds) of a "
                           "fetch-back association.")

    @field_validator("ae_title", "move_destination")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v) if v.strip() else ""

    @property
    def configured(self) -> bool:
        """Whether a PACS to fetch from is named."""
        return bool(self.ae_title and self.host)


class StorageConfig(_Section):
    """Where files and the embedded database live."""

    data_dir: Path = Field(
        Path("data"),
        description="Directory for stored files, quarantine, database and index. "
        "Relative paths resolve against the configuration file's directory.",
    )
    min_free_mb: int = Field(
        1024,
        ge=0,
        description="Free-disk watermark in MiB: below it, stores are refused with an "
        "out-of-resources status.",
    )
    fsync: bool = Field(
        True,
        description="fsync each file and its directory before acknowledging. Turning this "
        "off risks losing acknowledged instances on power loss.",
    )
    quarantine_max_mb: int = Field(
        1024,
        ge=0,
        description="Most MiB of refused datasets kept in the quarantine directory: beyond it "
        "a refused dataset is still refused with its status but no longer kept (logged at "
        "WARNING), so a sender of bad data cannot use up the disk that accepted studies "
        "need. 0 keeps none.",
    )
    keep_files: Literal["forever", "until_embedded"] | int = Field(
        "forever",
        description="How long received files are kept. forever: a full second copy. "
        "until_embedded: released once the instance is embedded (or skipped as not an image) "
        "and its study is stable; a number: released that many days after reception, once "
        "embedded. The catalogue, the vectors and the page's thumbnails stay: search, verify "
        "and reindex from stored vectors keep working; what needs the pixels again "
        "(re-embedding with a new model) fetches them back from storage.fetch. Failed and "
        "pending instances are kept.",
    )
    release_interval: float = Field(
        300.0, gt=0, description="Seconds between two runs of the release job (keep_files "
        "other than forever).")
    fetch: FetchConfig = Field(default_factory=FetchConfig)  # type: ignore[arg-type]

    @field_validator("keep_files", mode="before")
    @classmethod
    def _keep(cls, v: object) -> object:
        if isinstance(v, bool) or (isinstance(v, int) and v < 0):
            raise ValueError("must be forever, until_embedded or a number of days (0 or more)")
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        return v

    @property
    def releases(self) -> bool:
        """Whether files are released at all (``keep_files`` is not ``forever``)."""
        return self.keep_files != "forever"

    @property
    def keep_days(self) -> float:
        """Days a file is kept at least once embedded (0 for ``until_embedded``)."""
        return float(self.keep_files) if isinstance(self.keep_files, int) else 0.0


class DatabaseConfig(_Section):
    """The relational database that maps files, series and studies."""

    url: str = Field(
        "",
        description="SQLAlchemy URL. Empty: SQLite file sidecar.db in storage.data_dir. "
        "PostgreSQL: postgresql+psycopg://user:password@host/dbname",
    )
    busy_timeout_ms: int = Field(
        10000, ge=0, description="SQLite busy timeout in milliseconds."
    )
    echo: bool = Field(False, description="Log every SQL statement (debugging only).")


class StabilityConfig(_Section):
    """When a study counts as complete."""

    stable_age: float = Field(
        60.0,
        gt=0,
        description="Seconds without a new instance after which a study is marked stable "
        "(ready for embedding). A later instance re-opens it.",
    )
    check_interval: float = Field(
        5.0, gt=0, description="Seconds between checks for studies that became stable."
    )


class WindowPreset(_Section):
    """A VOI window (center/width in modality units, e.g. HU for CT)."""

    center: float = Field(description="Window center.")
    width: float = Field(gt=0, description="Window width (> 0).")


def _default_windows() -> dict[str, WindowPreset]:
    return {
        "soft_tissue": WindowPreset(center=40, width=400),
        "lung": WindowPreset(center=-600, width=1500),
        "bone": WindowPreset(center=400, width=1800),
        "brain": WindowPreset(center=40, width=80),
    }


class PreprocessConfig(_Section):
    """Pixel normalisation before embedding (SimpleITK)."""

    windows: dict[str, WindowPreset] = Field(
        default_factory=_default_windows,
        description="Named VOI windows (center/width in modality units, HU for CT).",
    )
    modality_window: dict[str, str] = Field(
        default_factory=lambda: {"CT": "soft_tissue"},
        description="Which named window each modality uses; modalities not listed "
        "(MR, US, CR, ...) get robust percentile scaling.",
    )
    use_file_window: bool = Field(
        False,
        description="Prefer the file's own Window Center/Width when it has one.",
    )
    @model_validator(mode="after")
    def _windows_exist(self) -> PreprocessConfig:
        for modality, name in self.modality_window.items():
            if name not in self.windows:
                raise ValueError(
                    f"modality_window.{modality}: unknown window {name!r} "
                    f"(known: {', '.join(sorted(self.windows))})"
                )
        return self

    percentile_low: float = Field(
        0.5, ge=0, lt=50, description="Lower percentile for percentile scaling."
    )
    percentile_high: float = Field(
        99.5, gt=50, le=100, description="Upper percentile for percentile scaling."
    )
    pixel_spacing_mm: float = Field(
        2.5,
        ge=0,
        description="In-plane spacing (mm) to resample to before fitting the model "
        "input; 0 keeps the native spacing. Images without spacing are only fitted. "
        "input_size x pixel_spacing_mm is the field of view (128 x 2.5 = 320 mm).",
    )
    slice_spacing_mm: float = Field(
        5.0,
        ge=0,
        description="Embed one slice every this many mm along a series (0: every slice).",
    )
    max_slices_per_series: int = Field(
        32, ge=1, description="Most slices embedded per series (evenly spread)."
    )


class EmbeddingConfig(_Section):
    """The CNN that turns slices into vectors (torch, CPU)."""

    model_path: Path | None = Field(
        None,
        description="Model file replacing the built-in model: an ONNX file (.onnx, run by "
        "onnxruntime; its input contract in FILE.onnx.json beside it) or a TorchScript file "
        "(deprecated: input N x 1 x S x S in [0, 1], output N x D). Empty: the built-in "
        "model shipped in the package.",
    )
    input_size: int = Field(
        128, ge=16, le=1024, description="Side of the square model input, in pixels."
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Slices per CNN batch.")
    threads: int = Field(
        1,
        ge=1,
        le=64,
        description="torch CPU threads for the CNN (for an ONNX model: onnxruntime's "
        "intra-op threads). Keep below the core count so ingest keeps a core.",
    )


class IndexConfig(_Section):
    """The hnswlib vector index (cosine)."""

    m: int = Field(16, ge=2, le=128, description="HNSW graph degree M.")
    ef_construction: int = Field(200, ge=8, description="HNSW ef at construction.")
    ef_search: int = Field(64, ge=8, description="HNSW ef at query time (>= k).")
    initial_capacity: int = Field(
        10000, ge=100, description="Initial capacity; the index grows by resizing."
    )
    save_interval: float = Field(
        60.0, gt=0, description="Seconds between periodic saves of the index (if changed)."
    )


class WorkerConfig(_Section):
    """The scheduled embedding job (APScheduler)."""

    enabled: bool = Field(True, description="Run the embedding job in `sidecar serve`.")
    interval: float = Field(5.0, gt=0, description="Seconds between embedding job runs.")
    batch_instances: int = Field(
        64, ge=1, description="Most instances claimed by one job run (bounded work)."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts before an instance is given up as failed."
    )
    retry_backoff: float = Field(
        60.0, ge=0, description="Seconds before the first retry; doubles per attempt."
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Scheduling niceness of the embedding thread (Linux): the CNN uses "
        "idle CPU first and yields to the DICOM receivers.",
    )
    ingest_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="While instances are arriving (one received in the last 2 s), the "
        "embedding job works at most this share of the time, pausing after each series, so "
        "the DICOM receivers keep the CPU they need; 1 = never pause.",
    )


class AdaptationConfig(_Section):
    """On-site adaptation: fine-tune the model on the archive's own slices (scheduled)."""

    enabled: bool = Field(
        False,
        description="Run the adaptation job on its schedule in `sidecar serve` (it needs the "
        "built-in or an adapted SliceNetV1 model: embedding.model_path must be empty).",
    )
    schedule: str = Field(
        "0 3 * * 0",
        description="When the job runs: a 5-field crontab expression (minute hour day month "
        "weekday), in UTC. The default is Sundays at 03:00.",
    )
    max_slices: int = Field(
        2000, ge=16, le=1_000_000,
        description="Most embedded slices of stable studies read for one run (whole series, "
        "seeded random order); training and held-out slices together.",
    )
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="Share of the sampled series kept out of training to compare the current "
        "and the fine-tuned model (seeded; whole studies when the sample spans two or more, "
        "then the share counts studies).",
    )
    epochs: int = Field(
        10, ge=1, le=1000,
        description="Training epochs over the training slices (about 1 min per epoch for "
        "2000 slices at 128 px on one core with the built-in model).",
    )
    min_improvement: float = Field(
        0.01, ge=0,
        description="The fine-tuned model replaces the current one only when its label-free "
        "score on the held-out slices is higher by at least this much.",
    )
    time_budget_minutes: float = Field(
        60.0, gt=0,
        description="Time budget of one run (reading slices, training, scoring): a training "
        "still running when it is spent is abandoned (checked after every epoch) and the "
        "current model stays. The re-embedding that follows an accepted model runs in the "
        "background afterwards and is not counted.",
    )
    study_positives: float = Field(
        0.25, ge=0, le=1,
        description="Probability that a training slice's positive is a slice of another series "
        "of its study (another reconstruction, phase or sequence of the same examination, the "
        "unit similarity queries rank) rather than a view of itself or a neighbouring slice; "
        "0 uses series only.",
    )
    seed: int = Field(
        0, ge=0, description="Seed of the slice sample, the held-out split and the training."
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        text = " ".join(v.split())
        try:
            CronTrigger.from_crontab(text, timezone="UTC")
        except ValueError as exc:
            raise ValueError(
                f"not a valid crontab expression (minute hour day month weekday): {exc}"
            ) from exc
        return text


class VolumeConfig(_Section):
    """Series searched as volumes: one vector per series built from its 3-D volume."""

    enabled: bool = Field(
        False,
        description="Off by default: on the val split it ranked below the slice ranking "
        "(docs/design/volumes.md). On: build a volume vector for every series of one "
        "orientation with at least "
        "min_slices slices (and for multi-frame volumes); series and study queries then rank "
        "by them. Off: series and study queries rank by slice vectors only.",
    )
    min_slices: int = Field(
        16, ge=3, le=4096,
        description="Fewest slices (instances or frames) a series needs to be built as a volume.",
    )
    grid_voxels: int = Field(
        64, ge=16, le=256,
        description="The volume is resampled to isotropic voxels, the longest side of the "
        "series' extent spanning this many (so the spacing is extent / grid_voxels mm).",
    )
    max_gap_ratio: float = Field(
        3.0, gt=1.0,
        description="A gap between adjacent slices longer than this many times the median "
        "spacing refuses the volume (missing slices).",
    )
    max_tilt_degrees: float = Field(
        45.0, ge=0.0, lt=90.0,
        description="Largest angle between the slice normal and the stacking direction "
        "(gantry tilt) that is resampled; a larger one refuses the volume.",
    )


class QueryConfig(_Section):
    """Similarity queries: result sizes, query by example and the audit log."""

    default_k: int = Field(
        10, ge=1, le=1000,
        description="Hits returned when a query gives no top-K ((0099,1004), -k, k=).",
    )
    max_k: int = Field(
        100, ge=1, le=1000,
        description="Most hits one query may return; a larger top-K is lowered to this.",
    )
    example_ae_title: str = Field(
        "SIDECAR_QUERY",
        description="Called AE title for query by example: an image sent by C-STORE to this "
        "AE title is embedded at once, kept in memory only (never archived) for "
        "example_ttl seconds, and can be referenced by its SOP Instance UID in a similarity "
        "C-FIND. Empty: query by example is off and only ae_title is accepted.",
    )
    example_ttl: float = Field(
        3600.0, gt=0, description="Seconds an example image stays queryable after it arrives."
    )
    max_examples: int = Field(
        1000, ge=1,
        description="Most example images held at once; the oldest expire first when full.",
    )
    audit_log: Path | None = Field(
        None,
        description="Append-only audit file of similarity queries (JSON lines: who, when, "
        "reference, hits); created with mode 0600. Empty: audit/similarity-queries.jsonl "
        "in the data directory.",
    )

    @field_validator("example_ae_title")
    @classmethod
    def _example_ae(cls, v: str) -> str:
        return _check_ae_title(v) if v.strip() else ""

    @field_validator("audit_log", mode="before")
    @classmethod
    def _audit_empty(cls, v: Any) -> Any:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @model_validator(mode="after")
    def _k_order(self) -> QueryConfig:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is larger than max_k ({self.max_k})")
        return self


class HttpTlsConfig(_Section):
    """HTTPS for the HTTP API, by default with client certificates (mutual TLS)."""

    enabled: bool = Field(
        False, description="Serve the HTTP API over HTTPS only (TLS 1.2 or later)."
    )
    certificate: Path | None = Field(
        None, description="PEM file with the API's certificate (then any intermediates)."
    )
    private_key: Path | None = Field(
        None, description="PEM file with the certificate's private key, unencrypted."
    )
    ca_certificates: Path | None = Field(
        None, description="PEM file of the certificate authorities whose client certificates "
        "are accepted."
    )
    require_client_certificate: bool = Field(
        True,
        description="Clients must present a certificate signed by ca_certificates (mutual "
        "TLS); false: HTTPS without client certificates. Bearer tokens apply either way "
        "(http.auth).",
    )

    @model_validator(mode="after")
    def _files_named(self) -> HttpTlsConfig:
        if not self.enabled:
            return self
        missing = [name for name in ("certificate", "private_key") if getattr(self, name) is None]
        if self.require_client_certificate and self.ca_certificates is None:
            missing.append("ca_certificates")
        if missing:
            raise ValueError(
                "TLS is enabled but " + ", ".join(f"http.tls.{m}" for m in missing)
                + (" is" if len(missing) == 1 else " are") + " not set"
                + (" (or set require_client_certificate: false)"
                   if missing == ["ca_certificates"] else "")
            )
        return self


class HttpConfig(_Section):
    """The HTTP API (similarity search, health, Prometheus metrics)."""

    enabled: bool = Field(False, description="Serve the HTTP API in `sidecar serve`.")
    bind_address: str = Field(
        "127.0.0.1",
        description="Address to listen on. A non-loopback address needs allow_remote: true, "
        "and bearer tokens are then required (http.auth).",
    )
    port: int = Field(8142, ge=1, le=65535, description="TCP port of the HTTP API.")
    allow_remote: bool = Field(
        False, description="Allow a bind_address other than loopback (clients then need a "
        "bearer token: http.auth cannot be none)."
    )
    auth: Literal["auto", "token", "none"] = Field(
        "auto",
        description="Bearer tokens (sidecar token create): `token` requires one on every route "
        "but /healthz; `auto` requires one when bind_address is beyond loopback and, on "
        "loopback, serves requests without one (a token presented is still checked and its "
        "scopes apply); `none` never asks (refused with a bind_address beyond loopback unless "
        "http.tls requires client certificates).",
    )
    metrics_auth: bool = Field(
        True,
        description="GET /metrics needs a token with scope metrics (or admin) whenever tokens "
        "are required; false serves it without one, like /healthz.",
    )
    max_upload_mb: int = Field(
        64, ge=1, le=4096, description="Largest DICOM file accepted by POST /v1/search, in MB."
    )
    tls: HttpTlsConfig = Field(default_factory=HttpTlsConfig)  # type: ignore[arg-type]

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError("must be an IP address such as 127.0.0.1") from exc
        return v

    @property
    def loopback(self) -> bool:
        """Whether the API listens on a loopback address only."""
        return ipaddress.ip_address(self.bind_address).is_loopback

    @property
    def tokens_required(self) -> bool:
        """Whether a request without a bearer token is refused (``/healthz`` aside)."""
        return self.auth == "token" or (self.auth == "auto" and not self.loopback)

    @model_validator(mode="after")
    def _loopback(self) -> HttpConfig:
        if not self.allow_remote and not self.loopback:
            raise ValueError(
                f"bind_address {self.bind_address} is not loopback: set allow_remote: true "
                "to serve the HTTP API beyond this host (bearer tokens are then required, "
                "see http.auth)"
            )
        certificates = self.tls.enabled and self.tls.require_client_certificate
        if self.auth == "none" and not self.loopback and not certificates:
            raise ValueError(
                f"http.auth is none but http.bind_address {self.bind_address} is beyond "
                "loopback: the HTTP API refuses to serve the network without authentication; "
                "set http.auth: token (or auto) and create tokens with sidecar token create, "
                "or require client certificates (http.tls)"
            )
        return self


class AuditSyslogConfig(_Section):
    """The syslog collector (IHE ATNA Audit Record Repository) audit messages are sent to."""

    enabled: bool = Field(False, description="Send every audit message to the collector.")
    host: str = Field("", description="Host name or IP address of the collector.")
    port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of the collector; empty: 514 for udp and tcp, 6514 for tls.",
    )
    protocol: Literal["udp", "tcp", "tls"] = Field(
        "tls",
        description="udp (RFC 5426: one datagram per message, nothing confirms delivery), "
        "tcp (RFC 6587 octet counting) or tls (RFC 5425, as IHE ATNA requires).",
    )
    ca_certificates: Path | None = Field(
        None,
        description="PEM file of the certificate authorities the collector's certificate "
        "must chain to (tls). Empty: the system's trust store.",
    )
    certificate: Path | None = Field(
        None,
        description="PEM file with this node's client certificate for the collector (tls; "
        "ATNA secure nodes authenticate both ways). Empty: no client certificate.",
    )
    private_key: Path | None = Field(
        None, description="PEM file with the client certificate's private key, unencrypted."
    )
    app_name: str = Field(
        "pacs-sidecar", description="RFC 5424 APP-NAME of the messages (1-48 printable ASCII)."
    )
    retry_seconds: float = Field(
        300.0, gt=0,
        description="How long a message the collector does not take is retried (with "
        "backoff) before it is dropped and counted (sidecar_audit_messages_dropped_total).",
    )
    timeout: float = Field(
        5.0, gt=0, description="Seconds to connect to the collector and to send one message."
    )

    @field_validator("app_name")
    @classmethod
    def _app_name(cls, v: str) -> str:
        if not re.fullmatch(r"[\x21-\x7e]{1,48}", v):
            raise ValueError("must be 1-48 printable ASCII characters without spaces")
        return v

    @model_validator(mode="after")
    def _host_named(self) -> AuditSyslogConfig:
        if self.enabled and not self.host.strip():
            raise ValueError("audit.syslog is enabled but audit.syslog.host is not set")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("audit.syslog.certificate and private_key go together")
        return self

    @property
    def effective_port(self) -> int:
        """The port in use: ``port``, or the protocol's usual one."""
        return self.port or (6514 if self.protocol == "tls" else 514)


class AuditConfig(_Section):
    """The DICOM audit trail (PS3.15 A.5 messages): local file and syslog collector."""

    enabled: bool = Field(
        True,
        description="Record audit messages (application start and stop, associations, "
        "instances received, queries, deletes, security alerts).",
    )
    file: Path | None = Field(
        None,
        description="Append-only local audit file: one RFC 5424 syslog line per message, "
        "created with mode 0600. Empty: audit/audit-messages.log in the data directory.",
    )
    fsync: bool = Field(
        True,
        description="fsync the audit file after each batch of lines (a record counts as "
        "written only then).",
    )
    source_id: str = Field(
        "",
        description="AuditSourceID of the messages. Empty: the DICOM AE title and the host "
        "name (AE@host).",
    )
    enterprise_site_id: str = Field(
        "", description="AuditEnterpriseSiteID of the messages (the hospital); empty: none."
    )
    associations: Literal["all", "refused"] = Field(
        "all",
        description="Which associations are audited as Node Authentication security alerts: "
        "all (accepted ones too, informative) or only refused ones.",
    )
    queue_size: int = Field(
        10000, ge=10,
        description="Messages waiting for the file or the collector at most; beyond it new "
        "messages are dropped and counted (never blocking DICOM or HTTP traffic).",
    )
    syslog: AuditSyslogConfig = Field(
        default_factory=AuditSyslogConfig  # type: ignore[arg-type]
    )

    @field_validator("file", mode="before")
    @classmethod
    def _file_empty(cls, v: Any) -> Any:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v


IocmAction = Literal["hide", "delete", "ignore"]


class IocmActionsConfig(_Section):
    """What a rejection note does to the instances it names, per document title."""

    quality: IocmAction = Field(
        "hide",
        description="(113001, DCM, \"Rejected for Quality Reasons\"). hide: rows and vectors "
        "removed, file moved to quarantine/rejected/ (recoverable by an administrator); "
        "delete: file removed too; ignore: the note is stored and nothing else happens.",
    )
    patient_safety: IocmAction = Field(
        "hide", description="(113037, DCM, \"Rejected for Patient Safety Reasons\")."
    )
    incorrect_worklist: IocmAction = Field(
        "hide", description="(113038, DCM, \"Incorrect Modality Worklist Entry\")."
    )
    retention_expired: IocmAction = Field(
        "delete", description="(113039, DCM, \"Data Retention Policy Expired\")."
    )


class IocmConfig(_Section):
    """IOCM rejection notes (Key Object Selection documents) received from the PACS."""

    actions: IocmActionsConfig = Field(
        default_factory=IocmActionsConfig  # type: ignore[arg-type]
    )
    refuse_rejected: bool = Field(
        True,
        description="Refuse (status 0xA770) an instance whose SOP Instance UID a rejection "
        "note named (hide or delete), whenever it arrives, so that it never returns to a "
        "search. false: store it again (it is searchable again).",
    )


class LoggingConfig(_Section):
    """Logging of the service."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Log level. Patient names and IDs are never logged at INFO or above.",
    )


class UiConfig(_Section):
    """The page for radiologists, served by the HTTP API under /ui/."""

    enabled: bool = Field(
        True, description="Serve the page under /ui/ whenever the HTTP API is enabled."
    )
    viewer_url: str = Field(
        "",
        description="Link 'open in viewer' of each study: a URL with {study} for the Study "
        "Instance UID, e.g. http://ohif:3000/viewer?StudyInstanceUIDs={study}. Empty: no link.",
    )
    thumbnail_cache_mb: int = Field(
        256, ge=1, le=1_000_000,
        description="Most MiB of thumbnails kept in thumbnails/ in the data directory; the "
        "least recently used are removed beyond it.",
    )
    session_hours: float = Field(
        8.0, gt=0, le=720,
        description="When tokens are required (http.auth): how long a browser's sign-in to "
        "the page lasts (a session cookie standing for the token; revoking the token ends it "
        "at once).",
    )

    @field_validator("viewer_url")
    @classmethod
    def _viewer(cls, v: str) -> str:
        text = v.strip()
        if text and not text.lower().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, or empty")
        if text and "{study}" not in text:
            raise ValueError("must contain {study} (the Study Instance UID)")
        try:
            text.format(study="1.2")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the placeholder {{study}} is known ({exc})") from exc
        return text


class Config(_Section):
    """The whole configuration of one sidecar."""

    dicom: DicomConfig = Field(default_factory=DicomConfig)  # type: ignore[arg-type]
    storage: StorageConfig = Field(default_factory=StorageConfig)  # type: ignore[arg-type]
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)  # type: ignore[arg-type]
    stability: StabilityConfig = Field(default_factory=StabilityConfig)  # type: ignore[arg-type]
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)  # type: ignore[arg-type]
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)  # type: ignore[arg-type]
    index: IndexConfig = Field(default_factory=IndexConfig)  # type: ignore[arg-type]
    worker: WorkerConfig = Field(default_factory=WorkerConfig)  # type: ignore[arg-type]
    volumes: VolumeConfig = Field(default_factory=VolumeConfig)  # type: ignore[arg-type]
    adaptation: AdaptationConfig = Field(
        default_factory=AdaptationConfig  # type: ignore[arg-type]
    )
    query: QueryConfig = Field(default_factory=QueryConfig)  # type: ignore[arg-type]
    http: HttpConfig = Field(default_factory=HttpConfig)  # type: ignore[arg-type]
    audit: AuditConfig = Field(default_factory=AuditConfig)  # type: ignore[arg-type]
    iocm: IocmConfig = Field(default_factory=IocmConfig)  # type: ignore[arg-type]
    logging: LoggingConfig = Field(default_factory=LoggingConfig)  # type: ignore[arg-type]
    ui: UiConfig = Field(default_factory=UiConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _distinct_ae_titles(self) -> Config:
        if self.query.example_ae_title and self.query.example_ae_title == self.dicom.ae_title:
            raise ValueError(
                f"query.example_ae_title must differ from dicom.ae_title ({self.dicom.ae_title}): "
                "images sent to it are examples, never archived"
            )
        return self

    # ------------------------------------------------------------------ derived
    @property
    def data_dir(self) -> Path:
        """Absolute data directory."""
        return self.storage.data_dir

    @property
    def storage_dir(self) -> Path:
        """Where accepted instances are kept."""
        return self.storage.data_dir / "storage"

    @property
    def index_dir(self) -> Path:
        """Where the vector index and its facts file live."""
        return self.storage.data_dir / "index"

    @property
    def previews_dir(self) -> Path:
        """Where the kept previews of released files live (``storage.keep_files``)."""
        return self.storage.data_dir / "thumbnails" / "kept"

    @property
    def quarantine_dir(self) -> Path:
        """Where refused datasets are kept for the administrator."""
        return self.storage.data_dir / "quarantine"

    @property
    def audit_log_path(self) -> Path:
        """The similarity query audit file."""
        return self.query.audit_log or self.storage.data_dir / "audit" / "similarity-queries.jsonl"

    @property
    def audit_file_path(self) -> Path:
        """The DICOM audit trail's local file."""
        return self.audit.file or self.storage.data_dir / "audit" / "audit-messages.log"

    @property
    def database_url(self) -> str:
        """The effective SQLAlchemy URL."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.storage.data_dir / 'sidecar.db'}"

    def effective(self) -> dict[str, Any]:
        """The effective configuration as plain data (for ``check-config``)."""
        data: dict[str, Any] = self.model_dump(mode="json")
        url = data["database"]["url"]
        data["database"]["url"] = _mask_password(url) if url else ""
        data["database"]["effective_url"] = _mask_password(self.database_url)
        return data


def _mask_password(url: str) -> str:
    """``url`` as written, its password (userinfo as SQLAlchemy parses it, query) as ``***``."""
    masked = re.sub(r"(://[^:/]*:)[^@]*@", r"\1***@", url, count=1)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", masked, flags=re.IGNORECASE)


# ---------------------------------------------------------------------- loading
def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    out: list[tuple[list[str], Any, str]] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((keys, value, name))
    return out


def _apply_override(data: dict[str, Any], keys: list[str], value: Any, env_name: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            dotted = ".".join(keys[: i + 1])
            raise ConfigError([f"{dotted}: {env_name} sets a key below a non-section value"])
        node = child
    node[keys[-1]] = value


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """``cfg`` with every relative path setting resolved against ``base``."""

    def absolute(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else (base / path).resolve()

    tls, http_tls = cfg.dicom.tls, cfg.http.tls
    tls_files = {name: absolute(getattr(tls, name))
                 for name in ("certificate", "private_key", "ca_certificates")}
    http_tls_files = {name: absolute(getattr(http_tls, name))
                      for name in ("certificate", "private_key", "ca_certificates")}
    return cfg.model_copy(update={
        "storage": cfg.storage.model_copy(update={"data_dir": absolute(cfg.storage.data_dir)}),
        "embedding": cfg.embedding.model_copy(
            update={"model_path": absolute(cfg.embedding.model_path)}),
        "query": cfg.query.model_copy(update={"audit_log": absolute(cfg.query.audit_log)}),
        "dicom": cfg.dicom.model_copy(update={"tls": tls.model_copy(update=tls_files)}),
        "http": cfg.http.model_copy(
            update={"tls": http_tls.model_copy(update=http_tls_files)}),
        "audit": cfg.audit.model_copy(update={
            "file": absolute(cfg.audit.file),
            "syslog": cfg.audit.syslog.model_copy(update={
                name: absolute(getattr(cfg.audit.syslog, name))
                for name in ("ca_certificates", "certificate", "private_key")}),
        }),
    })


def _format_errors(exc: ValidationError, from_env: Mapping[str, str]) -> list[str]:
    lines = []
    for err in exc.errors():
        dotted = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        env_names = [v for k, v in from_env.items() if dotted == k or dotted.startswith(k + ".")]
        origin = f" [from {env_names[0]}]" if env_names else ""
        lines.append(f"{dotted}: {msg}{shown}{origin}")
    return lines


def load_config(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load, override and validate the configuration.

    Parameters
    ----------
    path
        YAML file. ``None`` uses ``$SIDECAR_CONFIG`` when set, otherwise the
        built-in defaults (paths then resolve against the working directory).
    environ
        Environment to read ``SIDECAR__*`` overrides from (default ``os.environ``).

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a setting is invalid.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data: dict[str, Any] = {}
    source = "defaults"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read configuration file: {exc.strerror}"], source) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                [f"not valid YAML: not UTF-8 text (byte {exc.start})"], source
            ) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["(top level): must be a mapping of sections"], source)
        data = loaded
        base = p.resolve().parent
    from_env: dict[str, str] = {}
    for keys, value, env_name in _env_overrides(env):
        _apply_override(data, keys, value, env_name)
        from_env[".".join(keys)] = env_name
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, from_env), source) from exc
    return _resolve_paths(cfg, base)

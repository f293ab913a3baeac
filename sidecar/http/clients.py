"""Who asks the HTTP API and what they asked: shared by the API and the page (``ui.py``)."""

from __future__ import annotations

from fastapi import Request

from sidecar.search.front import Requester, SimilarityRequest


def requester(request: Request) -> Requester:
    """The client: its token's name when it sent one, else its address."""
    host = request.client.host if request.client is not None else ""
    token_name = request.scope.get("state", {}).get("token_name")
    return Requester("http", name=str(token_name or host), address=host)


def audit_keys(request: SimilarityRequest) -> dict[str, object]:
    """What an HTTP search asked, for its audit message (UIDs and settings, never pixels)."""
    ref = request.reference
    if ref.datasets:
        first = ref.datasets[0]
        reference: dict[str, object] = {
            "kind": "dataset",
            "sop_instance_uid": str(first.get("SOPInstanceUID", "")),
            "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        }
    else:
        reference = {"kind": ref.kind, "uid": ref.uid}
    flt = request.filters
    return {
        "reference": reference, "k": request.k, "level": request.level,
        "include_same_patient": request.include_same_patient,
        "modality": list(flt.modalities), "study_date": flt.study_date,
        "body_part": flt.body_part,
    }


__all__ = ["audit_keys", "requester"]

"""pacs-sidecar for Orthanc: a "Similar studies" button in Orthanc Explorer.

A script for Orthanc's Python plugin (Debian package ``orthanc-python``). It adds
to Orthanc's REST API

* ``GET /pacs-sidecar/studies/{orthanc id}/similar[?k=N]``: asks the sidecar's
  HTTP API (``GET /v1/similar?study=<StudyInstanceUID>``) and answers its ranked
  hits as JSON, each mapped to this Orthanc's study id with ``/tools/lookup``
  (``null`` when this Orthanc does not hold that study);
* ``GET /pacs-sidecar/thumbnails/{SOPInstanceUID}/{frame}.png``: the sidecar's
  thumbnail of a hit's best-matching slice, fetched by Orthanc (the browser
  never needs to reach the sidecar, and the token stays on the server);

and a **Similar studies** button on Orthanc Explorer's study page that lists the
hits (rank, score, description, date, modality, thumbnail), each linked to that
study's page in the same Orthanc.

Configuration, in Orthanc's own configuration file (all optional)::

    "PacsSidecar": {
      "Url": "http://127.0.0.1:8142",   // the sidecar's HTTP API
      "Token": "",                      // bearer token, once the API requires one
      "Top": 10,                        // hits asked for (k), unless the request says
      "Timeout": 30,                    // seconds per request to the sidecar
      "PageUrl": ""                     // the sidecar's page as browsers reach it
    }

Only the standard library is used: the script runs in Orthanc's embedded Python.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orthanc  # type: ignore[import-not-found]  # provided by the plugin inside Orthanc

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")

_CONFIG: dict[str, Any] = json.loads(orthanc.GetConfiguration()).get("PacsSidecar", {})
URL = str(_CONFIG.get("Url", "http://127.0.0.1:8142")).rstrip("/")
TOKEN = str(_CONFIG.get("Token", ""))
TOP = int(_CONFIG.get("Top", 10))
TIMEOUT = float(_CONFIG.get("Timeout", 30))
PAGE_URL = str(_CONFIG.get("PageUrl", "")).rstrip("/")


def _sidecar(path: str) -> tuple[int, bytes, str]:
    """GET ``path`` from the sidecar: (status, body, content type); status 0 when unreachable."""
    headers = {"Accept": "application/json, image/png"}
    if TOKEN:
        headers["Authorization"] = f"Bearer {TOKEN}"
    req = urllib.request.Request(URL + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "")
    except (OSError, ValueError) as exc:
        return 0, str(exc).encode(), "text/plain"


def _json_error(output: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message})
    output.SetHttpHeader("Content-Type", "application/json")
    output.SendHttpStatus(status, body, len(body.encode()))


def _orthanc_study(uid: str) -> str | None:
    """This Orthanc's id of a study, by its Study Instance UID (``None``: not here)."""
    found = json.loads(orthanc.RestApiPost("/tools/lookup", uid))
    for item in found:
        if item.get("Type") == "Study":
            return str(item["ID"])
    return None


def similar(output: Any, uri: str, **request: Any) -> None:
    """``GET /pacs-sidecar/studies/{id}/similar``: the sidecar's hits, mapped to Orthanc ids."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    orthanc_id = request["groups"][0]
    if not _ID.match(orthanc_id):
        _json_error(output, 404, f"{orthanc_id!r} is not an Orthanc study id")
        return
    try:
        study = json.loads(orthanc.RestApiGet(f"/studies/{orthanc_id}"))
    except Exception:  # noqa: BLE001 - orthanc.OrthancException: unknown resource
        _json_error(output, 404, f"no study {orthanc_id} in this Orthanc")
        return
    uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
    k = str(request.get("get", {}).get("k", TOP))
    if not k.isdigit() or int(k) < 1:
        _json_error(output, 400, f"k {k!r} must be a positive number")
        return
    query = urllib.parse.urlencode({"study": uid, "k": k})
    status, body, ctype = _sidecar(f"/v1/similar?{query}")
    if status != 200:
        detail = body.decode("utf-8", "replace")
        if ctype.startswith("application/json"):
            detail = json.loads(body).get("error", {}).get("message", detail)
        orthanc.LogWarning(f"pacs-sidecar: the sidecar answered {status or 'nothing'}")
        _json_error(output, 502 if status in (0, 500, 503) else status,
                    f"the sidecar at {URL} answered {status or 'nothing'}: {detail}")
        return
    answer = json.loads(body)
    hits = []
    for hit in answer.get("hits", []):
        match = hit.get("match") or {}
        target = _orthanc_study(hit["study_instance_uid"])
        sop, frame = match.get("hit_sop_instance_uid", ""), match.get("hit_frame")
        hits.append({
            "rank": hit["rank"],
            "score": hit["score"],
            "study_instance_uid": hit["study_instance_uid"],
            "study_description": hit.get("study_description", ""),
            "study_date": hit.get("study_date", ""),
            "modality": hit.get("modality", ""),
            "patient_id": hit.get("patient_id", ""),
            "orthanc_id": target,
            "explorer": f"explorer.html#study?uuid={target}" if target else None,
            "thumbnail": (f"../pacs-sidecar/thumbnails/{sop}/{frame}.png"
                          if sop and frame is not None else None),
            "sidecar_page": (f"{PAGE_URL}/ui/studies/{hit['study_instance_uid']}"
                             if PAGE_URL else None),
        })
    output.AnswerBuffer(json.dumps({
        "study_instance_uid": uid, "model_id": answer.get("model_id", ""),
        "sidecar_page": f"{PAGE_URL}/ui/studies/{uid}" if PAGE_URL else None, "hits": hits,
    }), "application/json")


def thumbnail(output: Any, uri: str, **request: Any) -> None:
    """``GET /pacs-sidecar/thumbnails/{sop}/{frame}.png``: the sidecar's thumbnail."""
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    sop, frame = request["groups"]
    if not _UID.match(sop) or len(sop) > 64 or not frame.isdigit():
        output.SendHttpStatusCode(404)
        return
    status, body, ctype = _sidecar(f"/ui/thumbnails/{sop}/{frame}.png")
    if status != 200 or not ctype.startswith("image/png"):
        output.SendHttpStatusCode(404 if status == 404 else 502)
        return
    output.SetHttpHeader("Cache-Control", "private, max-age=86400")
    output.AnswerBuffer(body, "image/png")


EXPLORER = r"""
$('#study').live('pagebeforeshow', function() { $('#pacs-sidecar-hits').empty(); });
$('#study').live('pagebeforecreate', function() {
  var button = $('<a>').attr('id', 'pacs-sidecar-similar').attr('data-role', 'button')
    .attr('href', '#').attr('data-icon', 'search').attr('data-theme', 'e')
    .text('Similar studies');
  var list = $('<div>').attr('id', 'pacs-sidecar-hits').attr('aria-live', 'polite');
  button.insertBefore($('#study-delete').parent().parent());
  list.insertAfter(button);
  button.click(function(ev) {
    ev.preventDefault();
    var id = $.mobile.pageData ? $.mobile.pageData.uuid : '';
    list.empty().append($('<p>').text('Asking the sidecar ...'));
    $.ajax({ url: '../pacs-sidecar/studies/' + id + '/similar', dataType: 'json',
      success: function(answer) {
        list.empty();
        if (!answer.hits.length) { list.append($('<p>').text('No similar studies.')); return; }
        var ol = $('<ol>').addClass('pacs-sidecar-hits').css({'list-style': 'none', 'padding': 0});
        $.each(answer.hits, function(i, hit) {
          var li = $('<li>').addClass('pacs-sidecar-hit').attr('data-study', hit.study_instance_uid)
            .css({'display': 'flex', 'gap': '0.8em', 'align-items': 'center', 'margin': '0.4em 0'});
          if (hit.thumbnail) {
            li.append($('<img>').attr('src', hit.thumbnail).attr('width', 64).attr('height', 64)
              .attr('alt', 'best-matching slice of hit ' + hit.rank));
          }
          var text = '#' + hit.rank + '  score ' + hit.score.toFixed(3) + '  ' +
            (hit.study_description || '(no description)') + '  ' + hit.study_date + '  ' +
            hit.modality;
          if (hit.explorer) {
            li.append($('<a>').attr('href', hit.explorer).attr('rel', 'external')
              .attr('data-ajax', 'false').addClass('pacs-sidecar-link').text(text));
          } else {
            li.append($('<span>').text(text + '  (not in this Orthanc)'));
          }
          ol.append(li);
        });
        list.append(ol);
        if (answer.sidecar_page) {
          list.append($('<a>').attr('href', answer.sidecar_page).attr('target', '_blank')
            .attr('rel', 'noopener noreferrer')
            .text('All hits, with why they matched, on the sidecar\'s page'));
        }
      },
      error: function(xhr) {
        var msg = 'The sidecar could not answer';
        try { msg = JSON.parse(xhr.responseText).error; } catch (e) {}
        list.empty().append($('<p>').text(msg));
      }
    });
  });
});
"""

orthanc.RegisterRestCallback("/pacs-sidecar/studies/(.*)/similar", similar)
orthanc.RegisterRestCallback("/pacs-sidecar/thumbnails/(.*)/([0-9]+)\\.png", thumbnail)
orthanc.ExtendOrthancExplorer(EXPLORER)

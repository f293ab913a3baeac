// pacs-sidecar page: filters without a full reload, and query by example (drop a file).
"use strict";
(function () {
  function params(form) {
    const out = new URLSearchParams();
    for (const [name, value] of new FormData(form)) {
      if (typeof value === "string" && value.trim() !== "") out.append(name, value.trim());
    }
    return out;
  }

  async function load(target, url, init) {
    target.setAttribute("aria-busy", "true");
    try {
      const resp = await fetch(url, Object.assign({ credentials: "same-origin" }, init || {}));
      const text = await resp.text();
      const type = resp.headers.get("content-type") || "";
      if (type.startsWith("text/html")) {
        target.innerHTML = text;  // our own server-rendered, escaped fragment
      } else {
        target.textContent = "The sidecar answered " + resp.status + ".";
      }
    } catch (err) {
      target.textContent = "The sidecar could not be reached: " + err;
    } finally {
      target.removeAttribute("aria-busy");
    }
  }

  function filters() {
    const form = document.getElementById("filters");
    const hits = document.getElementById("hits");
    if (!form || !hits) return;
    let timer = null;
    const refresh = function () {
      const q = params(form).toString();
      history.replaceState(null, "", form.getAttribute("action") + (q ? "?" + q : ""));
      load(hits, form.dataset.hits + (q ? "?" + q : ""));
    };
    form.addEventListener("submit", function (ev) { ev.preventDefault(); refresh(); });
    form.addEventListener("change", function () { clearTimeout(timer); timer = setTimeout(refresh, 150); });
  }

  function example() {
    const form = document.getElementById("example");
    const drop = document.getElementById("drop");
    const input = document.getElementById("example-file");
    const hits = document.getElementById("example-hits");
    if (!form || !drop || !input || !hits) return;
    let file = null;
    const send = function () {
      if (!file) { hits.textContent = "Choose or drop a DICOM file first."; return; }
      const q = params(form);
      q.delete("file");
      load(hits, "/ui/search?" + q.toString(), {
        method: "POST", body: file, headers: { "Content-Type": "application/dicom" },
      });
    };
    input.addEventListener("change", function () { file = input.files[0] || null; send(); });
    form.addEventListener("submit", function (ev) { ev.preventDefault(); send(); });
    ["dragenter", "dragover"].forEach(function (name) {
      drop.addEventListener(name, function (ev) { ev.preventDefault(); drop.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      drop.addEventListener(name, function () { drop.classList.remove("over"); });
    });
    drop.addEventListener("drop", function (ev) {
      ev.preventDefault();
      if (ev.dataTransfer && ev.dataTransfer.files.length) { file = ev.dataTransfer.files[0]; send(); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () { filters(); example(); });
})();

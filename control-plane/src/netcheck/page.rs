//! The connectivity matrix page (`/matrix`): senders down, receivers across, each cell colored by the
//! pair's state, latency and loss; absent receivers and outdated clients marked. The first frame comes
//! with the page; a script then fetches `/api/v1/matrix` every two seconds and redraws, so the page
//! follows the mesh live. Everything a client sent is put in as text (`textContent`), never as markup.

use std::sync::Arc;

use axum::extract::State as Shared;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::State;

pub async fn matrix_page(Shared(state): Shared<Arc<State>>) -> Response {
    let data = super::seed::matrix_view(&state).await;
    // Inside <script type=application/json>: only "</" could end it early.
    let data = data.to_string().replace("</", "<\\/");
    let page = PAGE.replace("{{DATA}}", &data);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

const PAGE: &str = r##"<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Keel connectivity matrix</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222}
#summary{margin-bottom:1em}
table{border-collapse:collapse;font-size:11px}
th{font-weight:normal;padding:2px 4px;white-space:nowrap}
thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;height:8em}
tbody th{text-align:right}
td{width:12px;height:12px;min-width:12px;border:1px solid #fff;padding:0}
td.none{background:#f2f2f2}
td.self{background:#ddd}
td.unknown{background:#bbb}
td.up{background:#1a9641}
td.up.l1{background:#a6d96a}
td.up.l2{background:#fdae61}
td.lossy{background:#f46d43}
td.down{background:#d7191c}
th.absent{color:#999;font-style:italic}
th.outdated{color:#b35806}
#legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
#updated.stale{color:#d7191c}
</style></head>
<body><h1>Connectivity matrix</h1>
<p id=summary></p>
<p id=legend><span class="up" style="background:#1a9641"></span>&lt; 1 ms<span style="background:#a6d96a"></span>&lt; 10 ms<span style="background:#fdae61"></span>slower<span style="background:#f46d43"></span>loss<span style="background:#d7191c"></span>down<span style="background:#bbb"></span>not judged yet<span style="background:#f2f2f2"></span>not probed
 &middot; rows send, columns receive &middot; <i>absent</i>: probed but not live &middot; <b style="color:#b35806">outdated</b>: older version
 &middot; <span id=updated></span></p>
<style id=cellsize></style>
<table id=matrix></table>
<script type=application/json id=data>{{DATA}}</script>
<script>
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function render(m) {
  const table = document.getElementById("matrix");
  table.replaceChildren();
  const names = m.clients.map(c => c.id).concat(m.absent);
  // The whole matrix fits about 900 px: 12 px cells up to 75 columns, down to 4 px (200 nodes: 800 px).
  // Past 60 columns the column labels give way to tooltips, as the row labels say who is who.
  const px = Math.max(4, Math.min(12, Math.floor(900 / Math.max(1, names.length))));
  document.getElementById("cellsize").textContent = "td{width:" + px + "px;height:" + px + "px;min-width:" + px + "px}";
  const labelled = names.length <= 60;
  const head = el("thead"), hr = el("tr");
  hr.appendChild(el("th"));
  m.clients.forEach(c => {
    const th = el("th", labelled ? c.id : "", c.outdated ? "outdated" : "");
    th.title = c.id + " " + (c.nodeIp || "") + " " + (c.podIp || "") + " v" + c.version;
    hr.appendChild(th);
  });
  m.absent.forEach(a => { const th = el("th", labelled ? a + " (absent)" : "", "absent"); th.title = a + ": probed, but no live client has this address"; hr.appendChild(th); });
  head.appendChild(hr);
  table.appendChild(head);
  const cells = new Map(m.cells.map(c => [c[0] * names.length + c[1], c]));
  const body = el("tbody");
  m.clients.forEach((c, row) => {
    const tr = el("tr");
    const th = el("th", c.id + (c.outdated ? " (outdated " + c.version + ")" : ""), c.outdated ? "outdated" : "");
    tr.appendChild(th);
    names.forEach((to, col) => {
      const cell = cells.get(row * names.length + col);
      const td = el("td");
      td.dataset.from = c.id;
      td.dataset.to = to;
      if (cell === undefined) {
        td.className = row === col ? "self" : "none";
        td.title = c.id + " \u2192 " + to + ": not probed";
      } else {
        const [, , state, latency, loss] = cell;
        let cls = state === 1 ? "up" : state === 2 ? "down" : "unknown";
        if (state === 1 && loss > 0) cls = "lossy";
        else if (state === 1 && latency !== null) cls += latency < 1 ? "" : latency < 10 ? " l1" : " l2";
        td.className = cls;
        td.title = c.id + " \u2192 " + to + ": " + (state === 1 ? "up" : state === 2 ? "DOWN" : "not judged yet") +
          (latency !== null ? ", " + latency + " ms" : "") + (loss > 0 ? ", loss " + Math.round(loss * 100) + "%" : "");
      }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  table.appendChild(body);
  const s = m.summary;
  const versions = Object.entries(s.versions).map(([v, n]) => n + " \u00d7 " + v).join(", ");
  document.getElementById("summary").textContent = s.clients + " live clients (" + versions + "); " + s.pairs +
    " probed pairs, " + s.unreachablePairs + " unreachable.";
}
function stamp(ok) {
  const u = document.getElementById("updated");
  u.textContent = (ok ? "updated " : "cannot update since ") + new Date().toLocaleTimeString();
  u.className = ok ? "" : "stale";
}
render(JSON.parse(document.getElementById("data").textContent));
stamp(true);
setInterval(() => {
  fetch("api/v1/matrix", {credentials: "same-origin"})
    .then(r => { if (!r.ok) throw new Error(r.status); return r.json(); })
    .then(m => { render(m); stamp(true); })
    .catch(() => stamp(false));
}, 2000);
</script></body></html>
"##;

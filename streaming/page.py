"""The watch page: a small HTML view of one task's stream, for people and browser tests."""

from __future__ import annotations

import html
import json

from streaming.events import TaskKey

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style nonce="__NONCE__">
  body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 46rem;
         padding: 0 1rem; color: #1d2329; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  #status { display: inline-block; padding: .1rem .6rem; border-radius: 1rem;
            background: #e8ecf0; font-weight: 600; }
  #status.completed { background: #d3f2dc; } #status.failed { background: #f8d7d7; }
  #status.cancelled { background: #f3e6c8; }
  progress { width: 100%; height: 1rem; margin: 1rem 0; }
  #conn { color: #66707a; font-size: .85rem; margin-left: .5rem; }
  ol { padding-left: 0; list-style: none; font: 13px/1.4 ui-monospace, monospace; }
  li { padding: .25rem .5rem; border-bottom: 1px solid #eef1f4; white-space: pre-wrap;
       word-break: break-word; }
  li b { display: inline-block; min-width: 6.5rem; }
  li.retry, li.error, li.cancelled { background: #fff6e5; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<span id="status">connecting</span><span id="conn"></span>
<progress id="bar" max="1" value="0"></progress>
<ol id="events"></ol>
<script nonce="__NONCE__">
(function () {
  const url = __STREAM_URL__;
  const seen = [];
  window.__streaming = { ids: seen, done: false, status: null, reconnects: 0 };
  const list = document.getElementById("events");
  const status = document.getElementById("status");
  const conn = document.getElementById("conn");
  const bar = document.getElementById("bar");
  const source = new EventSource(url);
  let opened = 0;
  source.onopen = function () {
    opened += 1;
    window.__streaming.reconnects = opened - 1;
    conn.textContent = opened > 1 ? "resumed after event " + (seen[seen.length - 1] || 0) : "";
    if (status.textContent === "connecting") { status.textContent = "running"; }
  };
  source.onerror = function () {
    if (!window.__streaming.done) { conn.textContent = "reconnecting…"; }
  };
  function show(type, event) {
    // EventSource fires its own "error" (connection lost) on the listener of the task's
    // "error" event type: only MessageEvents carry task events.
    if (!(event instanceof MessageEvent)) { return; }
    const id = Number(event.lastEventId);
    seen.push(id);
    const data = JSON.parse(event.data);
    const user = {};
    for (const k in data) { if (k[0] !== "_") { user[k] = data[k]; } }
    const item = document.createElement("li");
    item.className = type;
    const label = document.createElement("b");
    label.textContent = id + " " + type;
    item.appendChild(label);
    item.appendChild(document.createTextNode(" " + JSON.stringify(user)));
    list.appendChild(item);
    const step = data.step, total = data.total_steps || data.total;
    if (typeof step === "number" && typeof total === "number" && total > 0) {
      bar.max = total; bar.value = step;
    }
    if (type === "end") {
      window.__streaming.done = true;
      window.__streaming.status = data.status;
      status.textContent = data.status;
      status.className = data.status;
      if (data.status === "completed") { bar.value = bar.max; }
      conn.textContent = "";
      source.close();
    }
  }
  const types = __TYPES__;
  types.forEach(function (t) { source.addEventListener(t, function (e) { show(t, e); }); });
  source.onmessage = function (e) { show("message", e); };
})();
</script>
</body>
</html>
"""

# EventSource hands named events only to listeners of that name: the page listens for these,
# the types already in the task's log, and any given as ?types=a,b.
KNOWN_TYPES = ("start", "progress", "complete", "retry", "error", "cancelled", "end")


def render(
    key: TaskKey, stream_url: str, extra_types: tuple[str, ...] = (), nonce: str = ""
) -> str:
    """The page for one task, following ``stream_url``; its style and script carry ``nonce``
    (the Content-Security-Policy of the response allows only those)."""
    title = html.escape(f"{key.model_name} #{key.task_id}")
    types = list(dict.fromkeys(KNOWN_TYPES + extra_types))
    # json.dumps does not escape "</script>": "<" as \u003c keeps the data inside the script.
    return (
        _TEMPLATE.replace("__TITLE__", title)
        .replace("__NONCE__", html.escape(nonce))
        .replace("__STREAM_URL__", _js(stream_url))
        .replace("__TYPES__", _js(types))
    )


def headers(nonce: str) -> dict[str, str]:
    """The security headers of the page: only its own style and script, only its own stream."""
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return {
        "content-type": "text/html; charset=utf-8",
        "content-security-policy": csp,
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
    }


def _js(value: object) -> str:
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")

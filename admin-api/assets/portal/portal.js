// AI Hub portal: progressive enhancement only (every page works without it).
// - [data-copy="ID"] buttons copy the text of element #ID and say so (data-copied).
// - forms with data-confirm ask before submitting.
"use strict";
document.addEventListener("click", function (ev) {
  var b = ev.target.closest("[data-copy]");
  if (!b) return;
  var el = document.getElementById(b.getAttribute("data-copy"));
  if (!el) return;
  var text = el.textContent.trim();
  var done = function () {
    var was = b.textContent;
    b.textContent = b.getAttribute("data-copied") || "Copied";
    setTimeout(function () { b.textContent = was; }, 2000);
  };
  if (navigator.clipboard && navigator.clipboard.writeText) {
    navigator.clipboard.writeText(text).then(done, function () { select(el); });
  } else {
    select(el);
  }
});
function select(el) {
  var r = document.createRange();
  r.selectNodeContents(el);
  var s = window.getSelection();
  s.removeAllRanges();
  s.addRange(r);
}
document.addEventListener("submit", function (ev) {
  var f = ev.target;
  var q = f.getAttribute("data-confirm");
  if (q && !window.confirm(q)) ev.preventDefault();
});
// The event history (#events[data-stream]) shows new events as they happen: server-sent
// events from /portal/events/stream, each inserted at the top of the table.
(function () {
  var table = document.getElementById("events");
  if (!table || !window.EventSource) return;
  var url = table.getAttribute("data-stream");
  if (!url) return;
  var body = table.querySelector("tbody");
  var source = new EventSource(url);
  source.addEventListener("aihub", function (m) {
    var e = JSON.parse(m.data);
    if (document.querySelector('[data-event-id="' + e.id + '"]')) return;
    var tr = document.createElement("tr");
    tr.setAttribute("data-event-id", e.id);
    tr.className = "new";
    var cells = [e.type, e.created_at.replace("T", " ").replace(/:\d\d\.\d+Z$/, " UTC"), e.id];
    cells.forEach(function (text, i) {
      var td = document.createElement("td");
      if (i === 2) {
        var c = document.createElement("code");
        c.textContent = text;
        td.appendChild(c);
      } else {
        td.textContent = text;
      }
      tr.appendChild(td);
    });
    var td = document.createElement("td");
    var d = document.createElement("details");
    var s = document.createElement("summary");
    s.textContent = "data";
    var pre = document.createElement("pre");
    pre.textContent = JSON.stringify(e.data, null, 2);
    d.appendChild(s);
    d.appendChild(pre);
    td.appendChild(d);
    tr.appendChild(td);
    body.insertBefore(tr, body.firstChild);
    var none = document.getElementById("no-events");
    if (none) none.remove();
    table.hidden = false;
  });
})();
// The tasks page (#tasks[data-stream]) shows the progress of its unfinished tasks as they
// run: server-sent events from /portal/tasks/stream, each a task's row in place (status,
// progress, counts, finish time, result links, the cancel button). The stream is closed once
// every row shown has finished.
(function () {
  var table = document.getElementById("tasks");
  if (!table || !window.EventSource) return;
  var url = table.getAttribute("data-stream");
  if (!url) return;
  var source = new EventSource(url);
  source.addEventListener("task", function (m) {
    var t = JSON.parse(m.data);
    var tr = null;
    table.querySelectorAll("tr[data-task-id]").forEach(function (row) {
      if (row.getAttribute("data-task-id") === t.id) tr = row;
    });
    if (!tr) return;
    var badge = tr.querySelector(".task-badge");
    badge.className = "badge task-badge " + t.status;
    badge.setAttribute("data-status", t.status);
    badge.title = t.lifecycle;
    badge.textContent = t.status_text;
    tr.querySelector(".task-error").textContent = t.error;
    var bar = tr.querySelector("progress");
    bar.value = t.progress;
    bar.textContent = t.progress + " %";
    tr.querySelector(".task-pct").textContent = t.progress + " %";
    tr.querySelector(".task-counts").textContent = t.completed + " / " + t.failed + " / " + t.total;
    tr.querySelector(".task-finished").textContent = t.finished;
    var files = tr.querySelector(".task-files");
    files.textContent = "";
    [[t.result_url, "data-result"], [t.errors_url, "data-errors"]].forEach(function (f) {
      if (!f[0]) return;
      if (files.firstChild) files.appendChild(document.createTextNode(" \u00b7 "));
      var a = document.createElement("a");
      a.href = f[0];
      a.textContent = table.getAttribute(f[1]);
      files.appendChild(a);
    });
    if (!t.cancellable) {
      var cancel = tr.querySelector(".task-cancel");
      if (cancel) cancel.remove();
    }
    tr.setAttribute("data-done", t.done ? "true" : "false");
    if (!table.querySelector('tr[data-done="false"]')) source.close();
  });
})();

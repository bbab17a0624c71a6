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

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

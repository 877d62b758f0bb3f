// pgq dashboard: confirmation of actions and auto-refresh. No inline script
// (the Content-Security-Policy forbids it), no build step.
(function () {
  "use strict";

  // Actions: ask before posting; a confirmed form carries confirmed=1, otherwise
  // the server answers with its own confirmation page.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var msg = form.getAttribute("data-confirm");
    if (!msg) return;
    if (!window.confirm(msg)) { ev.preventDefault(); return; }
    var c = form.querySelector('input[name="confirmed"]');
    if (c) c.value = "1";
  });

  // Auto-refresh: fetch this page again and swap <main>; skipped while the tab
  // is hidden, the box is unticked, or a field has the focus.
  var seconds = Number(document.body.getAttribute("data-refresh") || "0");
  var box = document.getElementById("autorefresh");
  if (!seconds || !box) return;
  try { box.checked = localStorage.getItem("pgq.autorefresh") !== "off"; } catch (e) {}
  box.addEventListener("change", function () {
    try { localStorage.setItem("pgq.autorefresh", box.checked ? "on" : "off"); } catch (e) {}
  });
  var busy = false;
  var holding = false; // a pointer is down: never swap the page under a click
  document.addEventListener("pointerdown", function () { holding = true; }, true);
  document.addEventListener("pointerup", function () { setTimeout(function () { holding = false; }, 300); }, true);
  function idle() {
    if (holding || !box.checked || document.hidden) return false;
    var a = document.activeElement; // typing in a field (not a checkbox or button)
    var typing = a && (a.tagName === "TEXTAREA" ||
      (a.tagName === "INPUT" && /^(text|search|password|number|email|url)$/.test(a.type)));
    return !typing;
  }
  function tick() {
    if (busy || !idle()) return;
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Pgq-Refresh": "1" } })
      .then(function (r) { return r.ok || r.status === 404 ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("content");
        var main = document.getElementById("content");
        if (fresh && main && idle()) {
          main.replaceWith(document.importNode(fresh, true));
          document.body.setAttribute("data-refreshed", String(Date.now()));
        }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  window.setInterval(tick, seconds * 1000);
})();

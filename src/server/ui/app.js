// meshid status page: live updates. Polls /ui/status.json every 2 s; when anything but the
// generation time changed, fetches /ui and swaps in the new <main>. Without JavaScript the
// page is complete as served; reload to refresh.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var last = null;
  function say(text) { if (live) { live.textContent = text; } }
  function fingerprint(status) {
    var copy = Object.assign({}, status);
    delete copy.generated_at;
    copy.roots = (copy.roots || []).map(function (r) {
      var c = Object.assign({}, r); delete c.expires_in_seconds; return c;
    });
    return JSON.stringify(copy);
  }
  function refresh() {
    return fetch("/ui", { cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) { main.innerHTML = fresh.innerHTML; }
        ["generation", "generated"].forEach(function (id) {
          var a = doc.getElementById(id), b = document.getElementById(id);
          if (a && b) { b.textContent = a.textContent; if (a.dateTime) { b.dateTime = a.dateTime; } }
        });
      });
  }
  function poll() {
    fetch("/ui/status.json", { cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (status) {
        var f = fingerprint(status);
        if (f !== last) {
          // The first answer may already be newer than the page as served: swap it in too.
          var first = last === null;
          last = f;
          return refresh().then(function () {
            say(first ? "live: checking every 2 s" : "updated " + new Date().toLocaleTimeString());
          });
        }
        say("live: checking every 2 s");
      })
      .catch(function (e) { say("live updates paused: " + e.message); })
      .then(function () { setTimeout(poll, 2000); });
  }
  poll();
})();

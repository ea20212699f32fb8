// cllama operator UI: live updates, confirmations, copy buttons.
// The pages work without this file; it only makes them livelier.
(function () {
  "use strict";

  var liveState = null;
  var refreshing = false;
  var again = false;

  function setLive(mode, text) {
    if (!liveState) return;
    liveState.className = "live " + mode;
    var label = liveState.querySelector(".live-text");
    if (label) label.textContent = text;
  }

  // Fetch this page again and swap every [data-live] section that has an id.
  // Sections that hold forms are never marked live, so typing is never lost.
  function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch(window.location.href, {
      headers: { "Accept": "text/html", "X-Live": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      if (response.redirected || response.status === 401) {
        window.location.reload();
        return null;
      }
      if (!response.ok) return null;
      return response.text();
    }).then(function (text) {
      if (!text) return;
      var doc = new DOMParser().parseFromString(text, "text/html");
      var fresh = doc.querySelectorAll("[data-live][id]");
      for (var i = 0; i < fresh.length; i++) {
        var current = document.getElementById(fresh[i].id);
        if (current && !current.contains(document.activeElement)) {
          current.replaceWith(document.importNode(fresh[i], true));
        }
      }
      var stamp = new Date();
      setLive("on", "live · " + stamp.toLocaleTimeString());
      document.dispatchEvent(new CustomEvent("cllama:refreshed"));
    }).catch(function () {
      setLive("off", "reconnecting");
    }).then(function () {
      refreshing = false;
      if (again) { again = false; refresh(); }
    });
  }

  function connect() {
    if (!window.EventSource || document.body.getAttribute("data-live") !== "on") {
      setLive("", "not live");
      return;
    }
    var source = new EventSource("/events");
    source.addEventListener("hello", function () { setLive("on", "live"); });
    source.addEventListener("change", function () { refresh(); });
    source.addEventListener("expired", function () {
      source.close();
      window.location.reload();
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream (the session ended, or too many
        // streams): look again in a while; refresh() goes to the sign-in
        // page if the session is gone.
        setLive("off", "offline");
        window.setTimeout(function () { refresh(); connect(); }, 5000);
      } else {
        setLive("off", "reconnecting");
      }
    };
    window.addEventListener("pagehide", function () { source.close(); });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // Costs: picking dates means a custom period.
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (input.form && input.form.id === "cost-filter" && input.type === "date") {
      var select = input.form.querySelector("select[name=period]");
      if (select) select.value = "custom";
    }
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source) return;
    var text = source.textContent;
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {
      var range = document.createRange();
      range.selectNodeContents(source);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      try { document.execCommand("copy"); done(); } catch (e) { /* selected: copy by hand */ }
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    liveState = document.getElementById("live-state");
    connect();
  });
})();

// mesh console: live updates from /api/events, forms submitted in place.
// Every value from the server is set with textContent, never as HTML.
"use strict";

(function () {
  function cell(row, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text === null || text === undefined ? "-" : String(text);
    row.appendChild(td);
  }

  function renderFleet(fleet) {
    var banner = document.getElementById("kill-banner");
    if (banner) {
      banner.replaceChildren();
      fleet.kill.forEach(function (k) {
        var p = document.createElement("p");
        p.dataset.mode = k.mode;
        p.textContent = "Kill switch: " + k.text;
        banner.appendChild(p);
      });
      banner.hidden = fleet.kill.length === 0;
    }
    var total = document.getElementById("dead-total");
    if (total) total.textContent = String(fleet.dead_letters);
    var state = document.getElementById("nats-state");
    if (state) state.textContent = fleet.nats.connected ? "connected" : "disconnected";
    // An unreadable registry lists no agents: the forms keep the last list.
    if (fleet.agents.length || !fleet.error) renderAgentChoices(fleet.agents.map(function (a) { return a.agent; }));
    var body = document.querySelector("#fleet tbody");
    if (!body) return;
    body.replaceChildren();
    fleet.agents.forEach(function (a) {
      var tr = document.createElement("tr");
      tr.dataset.agent = a.agent;
      cell(tr, a.agent); cell(tr, a.delivery); cell(tr, a.state, "state");
      cell(tr, a.rtt_ms); cell(tr, a.pending);
      cell(tr, a.last_delivery ? a.last_delivery.outcome + " " + a.last_delivery.at : "-");
      cell(tr, a.dead_letters); cell(tr, a.paused ? "paused" : "no", "paused");
      body.appendChild(tr);
    });
  }

  // The action forms' agent lists follow the fleet (a page loaded before the
  // bot's first fleet read, or an agent added to the registry, needs no reload).
  function renderAgentChoices(agents) {
    document.querySelectorAll("form.action select[name=agent]").forEach(function (select) {
      var current = Array.from(select.options)
        .filter(function (o) { return !o.dataset.gone; })
        .map(function (o) { return o.value; }).filter(Boolean);
      if (current.join("\n") === agents.join("\n")) return;
      var chosen = select.value;
      var all = Array.from(select.options).find(function (o) { return o.value === ""; });
      select.replaceChildren();
      if (all) select.appendChild(all);
      agents.forEach(function (agent) {
        var option = document.createElement("option");
        option.value = agent;
        option.textContent = agent;
        select.appendChild(option);
      });
      // An agent chosen and gone from the registry stays chosen, marked:
      // a live update never changes an action's target (to "all agents",
      // say); the server decides what the action on it does.
      if (chosen !== "" && agents.indexOf(chosen) < 0) {
        var gone = document.createElement("option");
        gone.value = chosen;
        gone.textContent = chosen + " (no longer in the registry)";
        gone.dataset.gone = "1";
        select.appendChild(gone);
      }
      select.value = chosen;
    });
  }

  function renderTraffic(r) {
    var body = document.querySelector("#traffic tbody");
    if (!body) return;
    var tr = document.createElement("tr");
    tr.dataset.id = r.id;
    cell(tr, r.at); cell(tr, r.from); cell(tr, r.to); cell(tr, r.kind); cell(tr, r.priority);
    cell(tr, r.text, "text"); cell(tr, r.outcome, "outcome"); cell(tr, r.latency_ms);
    var old = body.querySelector('tr[data-id="' + CSS.escape(r.id) + '"]');
    if (old) body.replaceChild(tr, old); else body.insertBefore(tr, body.firstChild);
    while (body.children.length > 200) body.removeChild(body.lastChild);
  }

  function addEvent(text) {
    var list = document.getElementById("events");
    if (!list) return;
    var li = document.createElement("li");
    li.textContent = text;
    list.insertBefore(li, list.firstChild);
  }

  function showReply(reply) {
    var box = document.getElementById("result");
    if (!box) return;
    var div = document.createElement("div");
    div.className = "reply";
    div.dataset.tone = "info";
    var title = document.createElement("p");
    title.className = "title";
    title.textContent = reply.title;
    div.appendChild(title);
    reply.lines.forEach(function (line) {
      var p = document.createElement("p");
      p.textContent = line;
      div.appendChild(p);
    });
    box.insertBefore(div, box.firstChild);
  }

  function connect() {
    if (!window.EventSource) return;
    var source = new EventSource("/api/events");
    source.addEventListener("fleet", function (e) { renderFleet(JSON.parse(e.data)); });
    source.addEventListener("traffic", function (e) { renderTraffic(JSON.parse(e.data)); });
    source.addEventListener("event", function (e) {
      var ev = JSON.parse(e.data);
      addEvent(ev.at + " " + ev.kind + ": " + ev.text);
    });
    source.addEventListener("reply", function (e) { showReply(JSON.parse(e.data)); });
    document.documentElement.dataset.live = "connecting";
    source.onopen = function () { document.documentElement.dataset.live = "open"; };
  }

  // Action forms: posted in place, the reply (HTML made by the server) shown in #result.
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (!form.classList || !form.classList.contains("action")) return;
    e.preventDefault();
    var data = new URLSearchParams(new FormData(form));
    if (e.submitter && e.submitter.name) data.set(e.submitter.name, e.submitter.value);
    fetch(form.action, { method: "POST", body: data, headers: { "X-Mesh-Fragment": "1" }, credentials: "same-origin" })
      .then(function (response) { return response.text().then(function (html) { return [response.ok, html]; }); })
      .then(function (answer) {
        var ok = answer[0], html = answer[1];
        var holder = document.createElement("div");
        holder.innerHTML = html; // the server escaped every value in it
        // A dead letter replayed is no longer stored: its row goes. One not
        // replayed (no longer stored, undecodable, a failed publish) is an
        // error answer (422) and its row stays.
        if (form.classList.contains("replay") && ok && holder.querySelector('.reply[data-tone="ok"]')) {
          var row = form.closest("tr");
          if (row) row.remove();
        }
        var box = document.getElementById("result");
        if (!box) return;
        while (holder.lastChild) box.insertBefore(holder.lastChild, box.firstChild);
        // The answer (a confirmation prompt, say) is shown above the forms: bring it into view.
        if (box.firstElementChild && box.firstElementChild.scrollIntoView) {
          box.firstElementChild.scrollIntoView({ block: "nearest" });
        }
        if (form.tagName === "FORM" && !form.classList.contains("confirm")) {
          var text = form.querySelector("textarea");
          if (text) text.value = "";
        }
      });
  });

  document.addEventListener("DOMContentLoaded", connect);
})();

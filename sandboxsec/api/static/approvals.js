// The signed-in person's pending requests, newest first, each linking to its detail page.
// Every value is inserted as text, never as HTML.
"use strict";

(function () {
  const P = window.SandboxsecPasskey;
  const $ = (id) => document.getElementById(id);

  function summary(req) {
    const p = req.params || {};
    const parts = [req.action];
    if (p.amount !== undefined) parts.push(p.amount + " " + (p.currency || ""));
    if (p.payee !== undefined) parts.push("to " + p.payee);
    if (p.domain !== undefined) parts.push(p.domain);
    parts.push("code " + req.short_code);
    if (req.quorum > 1) parts.push(req.approvals + " of " + req.quorum + " approvals");
    return parts.join(" - ");
  }

  async function list() {
    const resp = await fetch("/v1/me/approvals", { credentials: "same-origin", cache: "no-store" });
    if (!resp.ok) { $("result").textContent = await P.errorText(resp); return; }
    const items = await resp.json();
    $("list").replaceChildren();
    for (const req of items) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = "/approve/" + encodeURIComponent(req.id);
      a.textContent = summary(req);
      a.dataset.approvalId = req.id;
      li.appendChild(a);
      $("list").appendChild(li);
    }
    $("empty").hidden = items.length !== 0;
  }

  async function start() {
    const me = await P.me();
    if (!me) { $("signin").hidden = false; return; }
    $("signin").hidden = true;
    $("who").textContent = "Signed in as " + me.name + " (" + me.handle + ")";
    await list();
  }

  $("signin").addEventListener("click", async () => {
    $("result").textContent = "";
    try { await P.signIn(); } catch (e) { $("result").textContent = e.message; return; }
    await start();
  });
  start();
})();

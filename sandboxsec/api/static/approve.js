// The approval page.  It shows the request exactly as stored, recomputes params_hash from the
// params it displays (RFC 8785 canonical JSON, SHA-256) and decides on that hash only:
//  * signed in with a passkey (the person's path): approve / deny are WebAuthn assertions over
//    a single-use challenge the server made for this request, these params (keyed: params_hmac)
//    and this decision; the page checks the challenge is for this request, this decision and
//    the hash it computed of the params it shows before asking the authenticator;
//  * with an approver API key (the machine path, when the policy allows it): the hash is sent
//    with the decision as before.
// Every value is inserted as text, never as HTML.
"use strict";

(function () {
  const P = window.SandboxsecPasskey;
  const approvalId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const $ = (id) => document.getElementById(id);
  let shown = null;
  let mode = null;  // "person" or "key"

  // A key passed in the fragment (never sent to the server) pre-fills the field once.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("key")) {
    $("key").value = fragment.get("key");
    history.replaceState(null, "", location.pathname);
  }

  function canonical(value) {
    if (value === null || typeof value === "boolean") return JSON.stringify(value);
    if (typeof value === "number") {
      if (!Number.isSafeInteger(value)) throw new Error("non-integer number in params");
      return String(value);
    }
    if (typeof value === "string") return JSON.stringify(value);
    if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
    // JavaScript sorts strings by UTF-16 code units, as RFC 8785 requires.
    const keys = Object.keys(value).sort();
    return "{" + keys.map((k) => JSON.stringify(k) + ":" + canonical(value[k])).join(",") + "}";
  }

  async function sha256Hex(text) {
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
    return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  function keyHeaders() {
    return { "Authorization": "Bearer " + $("key").value.trim(),
             "Content-Type": "application/json" };
  }

  // Characters that do not display as themselves (bidi controls, zero-width and other
  // invisible characters, line separators, look-alike spaces) are written out as <U+XXXX>, so
  // the page never shows other text than the one the grant binds (the service refuses them in
  // new requests; this covers anything stored before).  Same list as sandboxsec/display.py.
  const UNSAFE = new RegExp("[\\p{Cc}\\p{Cf}\\p{Cs}\\p{Co}\\p{Cn}\\p{Zl}\\p{Zp}" +
    "\\u00A0\\u1680\\u2000-\\u200A\\u202F\\u205F\\u3000\\u034F\\u115F\\u1160" +
    "\\u17B4\\u17B5\\u180B-\\u180F\\u2800\\u3164\\uFFA0\\uFE00-\\uFE0F" +
    "\\u{E0100}-\\u{E01EF}]", "gu");

  function visible(value, keepLines) {
    return value.replace(UNSAFE, (ch) => keepLines && (ch === "\n" || ch === "\t") ? ch
      : "<U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + ">");
  }

  function text(id, value) {
    $(id).textContent = value === undefined || value === null || value === ""
      ? "-" : visible(String(value));
  }

  function resourcePart(resource, kind) {
    const prefix = kind + ":";
    return resource.startsWith(prefix) ? resource.slice(prefix.length) : undefined;
  }

  function render(req, localHash) {
    const p = req.params || {};
    text("short-code", req.short_code);
    text("action", req.action);
    text("amount", p.amount);
    text("currency", p.currency);
    // The canonical target the policy decided on (a domain in its A-label form, so a
    // look-alike name shows as xn--...); the params' spelling only when there is none.
    const target = (kind) => resourcePart(req.resource, kind) !== undefined
      ? resourcePart(req.resource, kind) : p[kind];
    text("payee", target("payee"));
    text("app", target("app"));
    text("domain", target("domain"));
    text("resource", req.resource);
    text("session", req.session_id);
    text("image", req.image_name + (req.image_digest ? " (" + req.image_digest + ")" : ""));
    text("attested", req.attested ? "yes" : "NO");
    text("reason", req.reason);
    text("expires", new Date(req.expires_at).toLocaleString() + " (" + req.expires_at + ")");
    text("state", req.state);
    text("quorum", req.quorum === undefined ? "an approver"
         : (req.quorum > 1 ? req.quorum + " different people (" + req.approvals + " so far)"
                           : "one person") + (req.my_vote ? "; you chose " + req.my_vote : ""));
    $("params").textContent = visible(JSON.stringify(p, null, 2), true);
    text("params-hash", localHash);
    const open = req.state === "pending" && !req.my_vote;
    $("approve").disabled = !open;
    $("deny").disabled = !open;
    $("request").hidden = false;
  }

  async function show(resp) {
    if (!resp.ok) { $("result").textContent = await P.errorText(resp); return; }
    const req = await resp.json();
    const localHash = await sha256Hex(canonical(req.params));
    if (localHash !== req.params_hash) {
      $("result").textContent = "The parameters do not match their hash: do not approve.";
      return;
    }
    shown = { hash: localHash };
    render(req, localHash);
  }

  async function loadPerson() {
    mode = "person";
    $("key-form").hidden = true;
    $("signin").hidden = true;
    await show(await fetch("/v1/me/approvals/" + encodeURIComponent(approvalId),
                           { credentials: "same-origin", cache: "no-store" }));
  }

  async function loadKey(event) {
    if (event) event.preventDefault();
    mode = "key";
    $("result").textContent = "";
    $("status").textContent = "Loading...";
    const resp = await fetch("/v1/approvals/" + encodeURIComponent(approvalId),
                             { headers: keyHeaders(), cache: "no-store" });
    $("status").textContent = "";
    await show(resp);
  }

  async function decidePerson(verb) {
    const path = "/v1/me/approvals/" + encodeURIComponent(approvalId);
    const ch = await P.post(path + "/challenge", { decision: verb });
    if (!ch.ok) return P.errorText(ch);
    const challenge = await ch.json();
    // The authenticator only shows the site and the account: check here that what it will
    // sign commits to this request, this decision and the params on this screen.
    const pre = JSON.parse(challenge.preimage);
    if (pre.approval_id !== approvalId || pre.decision !== verb
        || challenge.params_hash !== shown.hash) {
      return "The challenge does not match what is shown: not signed.";
    }
    let credential;
    try { credential = await P.get(challenge); } catch (e) { return "Not signed: " + e.name; }
    const resp = await P.post(path + "/" + verb, {
      challenge_id: challenge.challenge_id, params_hash: shown.hash, credential });
    if (!resp.ok) return P.errorText(resp);
    const req = await resp.json();
    text("state", req.state);
    if (req.state === "pending") return "Your approval is recorded; waiting for more people.";
    return verb === "approve" ? "Approved." : "Denied.";
  }

  async function decideKey(verb) {
    const resp = await fetch("/v1/approvals/" + encodeURIComponent(approvalId) + "/" + verb, {
      method: "POST", headers: keyHeaders(), body: JSON.stringify({ params_hash: shown.hash }),
    });
    if (!resp.ok) return P.errorText(resp);
    const req = await resp.json();
    text("state", req.state);
    return verb === "approve" ? "Approved." : "Denied.";
  }

  async function decide(verb) {
    if (!shown) return;
    $("approve").disabled = true;
    $("deny").disabled = true;
    $("result").textContent = mode === "person" ? await decidePerson(verb) : await decideKey(verb);
  }

  $("key-form").addEventListener("submit", loadKey);
  $("approve").addEventListener("click", () => decide("approve"));
  $("deny").addEventListener("click", () => decide("deny"));
  $("signin").addEventListener("click", async () => {
    $("result").textContent = "";
    let person;
    try { person = await P.signIn(); } catch (e) { $("result").textContent = e.message; return; }
    $("who").textContent = "Signed in as " + person.name + " (" + person.handle + ")";
    await loadPerson();
  });

  (async function start() {
    if ($("key").value) { await loadKey(); return; }
    const person = await P.me();
    if (person) {
      $("who").textContent = "Signed in as " + person.name + " (" + person.handle + ")";
      await loadPerson();
    }
  })();
})();

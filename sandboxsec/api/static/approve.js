// The approver's page.  It shows the request exactly as stored, recomputes params_hash from
// the params it displays (RFC 8785 canonical JSON, SHA-256) and sends that hash with the
// decision: the server refuses it unless it is the request's own, so what is approved is what
// was on this screen.  Every value is inserted as text, never as HTML.
"use strict";

(function () {
  const approvalId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const $ = (id) => document.getElementById(id);
  let shown = null;

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

  function headers() {
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
    $("params").textContent = visible(JSON.stringify(p, null, 2), true);
    text("params-hash", localHash);
    const open = req.state === "pending";
    $("approve").disabled = !open;
    $("deny").disabled = !open;
    $("request").hidden = false;
  }

  async function fail(resp) {
    let code = "http_" + resp.status, message = "";
    try {
      const body = await resp.json();
      code = body.error.code;
      message = body.error.message;
    } catch (e) { /* not our error document */ }
    $("result").textContent = "Refused: " + code + (message ? " - " + message : "");
  }

  async function load(event) {
    if (event) event.preventDefault();
    $("result").textContent = "";
    $("status").textContent = "Loading...";
    const resp = await fetch("/v1/approvals/" + encodeURIComponent(approvalId),
                             { headers: headers(), cache: "no-store" });
    $("status").textContent = "";
    if (!resp.ok) { await fail(resp); return; }
    const req = await resp.json();
    const localHash = await sha256Hex(canonical(req.params));
    if (localHash !== req.params_hash) {
      $("result").textContent = "The parameters do not match their hash: do not approve.";
      return;
    }
    shown = { hash: localHash };
    render(req, localHash);
  }

  async function decide(verb) {
    if (!shown) return;
    $("approve").disabled = true;
    $("deny").disabled = true;
    const resp = await fetch("/v1/approvals/" + encodeURIComponent(approvalId) + "/" + verb, {
      method: "POST", headers: headers(), body: JSON.stringify({ params_hash: shown.hash }),
    });
    if (!resp.ok) { await fail(resp); return; }
    const req = await resp.json();
    text("state", req.state);
    $("result").textContent = verb === "approve" ? "Approved." : "Denied.";
  }

  $("key-form").addEventListener("submit", load);
  $("approve").addEventListener("click", () => decide("approve"));
  $("deny").addEventListener("click", () => decide("deny"));
  if ($("key").value) load();
})();

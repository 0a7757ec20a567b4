// Passkey helpers shared by the enrolment and approval pages: WebAuthn JSON <-> the browser's
// ArrayBuffers, and one error reader.  Nothing here decides anything: the server verifies
// every registration and assertion.
"use strict";

(function () {
  function fromB64url(text) {
    const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64 + "===".slice((b64.length + 3) % 4));
    return Uint8Array.from(bin, (c) => c.charCodeAt(0)).buffer;
  }

  function toB64url(buffer) {
    const bytes = new Uint8Array(buffer);
    let bin = "";
    for (const b of bytes) bin += String.fromCharCode(b);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map((d) => Object.assign({}, d, { id: fromB64url(d.id) }));
  }

  async function create(options) {
    const pk = Object.assign({}, options.publicKey);
    pk.challenge = fromB64url(pk.challenge);
    pk.user = Object.assign({}, pk.user, { id: fromB64url(pk.user.id) });
    pk.excludeCredentials = descriptors(pk.excludeCredentials);
    const cred = await navigator.credentials.create({ publicKey: pk });
    return {
      id: cred.id, rawId: toB64url(cred.rawId), type: cred.type,
      response: {
        clientDataJSON: toB64url(cred.response.clientDataJSON),
        attestationObject: toB64url(cred.response.attestationObject),
      },
    };
  }

  async function get(options) {
    const pk = Object.assign({}, options.publicKey);
    pk.challenge = fromB64url(pk.challenge);
    pk.allowCredentials = descriptors(pk.allowCredentials);
    const cred = await navigator.credentials.get({ publicKey: pk });
    const r = cred.response;
    return {
      id: cred.id, rawId: toB64url(cred.rawId), type: cred.type,
      response: {
        clientDataJSON: toB64url(r.clientDataJSON),
        authenticatorData: toB64url(r.authenticatorData),
        signature: toB64url(r.signature),
        userHandle: r.userHandle ? toB64url(r.userHandle) : null,
      },
    };
  }

  async function errorText(resp) {
    let code = "http_" + resp.status, message = "";
    try {
      const body = await resp.json();
      code = body.error.code;
      message = body.error.message;
    } catch (e) { /* not our error document */ }
    return "Refused: " + code + (message ? " - " + message : "");
  }

  async function post(path, body) {
    return fetch(path, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body === undefined ? {} : body),
    });
  }

  // Sign in with any passkey registered here; resolves to the person or throws the refusal.
  async function signIn() {
    const opts = await post("/v1/signin/options");
    if (!opts.ok) throw new Error(await errorText(opts));
    const options = await opts.json();
    const credential = await get(options);
    const resp = await post("/v1/signin", { challenge_id: options.challenge_id, credential });
    if (!resp.ok) throw new Error(await errorText(resp));
    return resp.json();
  }

  async function me() {
    const resp = await fetch("/v1/me", { credentials: "same-origin", cache: "no-store" });
    return resp.ok ? resp.json() : null;
  }

  window.SandboxsecPasskey = { create, get, post, errorText, signIn, me };
})();

// The enrolment page: fetch registration options for this one-time link, create a passkey
// (resident key, user verification required) and hand it to the server, which verifies it.
"use strict";

(function () {
  const P = window.SandboxsecPasskey;
  const token = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const $ = (id) => document.getElementById(id);
  const base = "/v1/enroll/" + encodeURIComponent(token);

  async function register() {
    $("register").disabled = true;
    $("result").textContent = "";
    try {
      const opts = await P.post(base + "/options");
      if (!opts.ok) { $("result").textContent = await P.errorText(opts); return; }
      const options = await opts.json();
      const credential = await P.create(options);
      const resp = await P.post(base + "/register",
                                { challenge_id: options.challenge_id, credential });
      $("result").textContent = resp.ok ? "Passkey registered." : await P.errorText(resp);
    } catch (e) {
      $("result").textContent = "Refused: " + e.name + " - " + e.message;
      $("register").disabled = false;
    }
  }

  async function show() {
    // Options are fetched once to show whose link this is; each attempt fetches fresh ones.
    const opts = await P.post(base + "/options");
    if (!opts.ok) { $("result").textContent = await P.errorText(opts); return; }
    const options = await opts.json();
    $("name").textContent = options.name;
    $("handle").textContent = options.handle;
    $("who").hidden = false;
    $("register").disabled = false;
  }

  $("register").addEventListener("click", register);
  show();
})();

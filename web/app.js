// Mailroom's page. Everything it shows comes from the JSON API under /api/, with the
// same guard as any other client: a direct local client needs no token; anyone else is
// asked for it once, and it is kept in sessionStorage (this tab only).
//
// Safe by construction: values from messages are only ever written as text
// (textContent, attributes set one by one); the page's Content-Security-Policy forbids
// inline script and, through Trusted Types, any markup sink except the one policy below
// that fills the sandboxed mail preview.
//
// Live status is polled: GET /api/messages?limit=50 once a second while a message on
// screen is still on its way (queued, sending, retrying), every 10 s otherwise, and not
// at all while the tab is hidden. The open message polls its own record the same way.
"use strict";

(() => {
  const TOKEN_KEY = "mailroom.token";
  const FINAL = new Set(["sent", "partial", "failed", "cancelled"]);
  const FAST = 1000;
  const SLOW = 10000;
  const OUTBOX_EVERY = 3000;
  const LIST_LIMIT = 50;
  // The preview: nothing may load (data: images aside). The page's own policy, which an
  // about:srcdoc frame inherits, holds there too (so the mail's inline styles do not
  // apply either). sandbox="" on the frame: no scripts, forms, popups or navigation.
  const PREVIEW_CSP = "default-src 'none'; img-src data:";

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);

  // The only way markup gets anywhere: the preview frame's srcdoc.
  const previewPolicy = window.trustedTypes
    ? window.trustedTypes.createPolicy("mailroom-preview", { createHTML: (html) => html })
    : { createHTML: (html) => html };

  // -- the API -------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, field) {
      super(message);
      this.status = status;
      this.field = field || null;
    }
  }

  class TokenNeeded extends Error {}

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const init = { method: options.method || "GET", headers, cache: "no-store", credentials: "omit" };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "The server cannot be reached. Is Mailroom running?");
    }
    if (response.status === 401) {
      const message = await errorMessage(response);
      askForToken(message, Boolean(token));
      throw new TokenNeeded(message);
    }
    if (options.raw && response.ok) return response;
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok) {
      const body = type.includes("application/json") ? await response.json() : null;
      const message = body && body.error ? body.error : await fallbackText(response, body);
      throw new ApiError(response.status, message, body && body.field);
    }
    return response.json();
  }

  async function errorMessage(response) {
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("application/json")) {
      const body = await response.json();
      return body && body.error ? String(body.error) : "";
    }
    return (await response.text()).trim();
  }

  async function fallbackText(response, body) {
    if (body) return response.status + " " + response.statusText;
    const text = (await response.text()).trim();
    return text || response.status + " " + response.statusText;
  }

  // -- small DOM helpers (text only) ---------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function setText(id, value) {
    $(id).textContent = value === null || value === undefined ? "" : String(value);
  }

  const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });

  function timeNode(iso, short) {
    if (!iso) return el("span", { text: "—" });
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return el("span", { text: iso });
    const today = new Date().toDateString() === date.toDateString();
    const shown = short && today ? clockFormat.format(date) : timeFormat.format(date);
    return el("time", { datetime: iso, title: date.toString(), text: shown });
  }

  function badge(status) {
    return el("span", { className: "badge st-" + status, text: status });
  }

  function showProblem(message) {
    const box = $("problem");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function reportError(err) {
    if (err instanceof TokenNeeded) return;
    showProblem(err instanceof ApiError ? err.message : "Something went wrong: " + err);
  }

  // -- the token -----------------------------------------------------------------------

  let afterToken = null; // what to do once a token works

  function askForToken(serverSays, hadToken) {
    stopPolling();
    if (hadToken) {
      token = null;
      sessionStorage.removeItem(TOKEN_KEY);
    }
    for (const view of document.querySelectorAll(".view")) view.hidden = true;
    showProblem("");
    $("auth").hidden = false;
    $("forget-token").hidden = true;
    const why = serverSays && serverSays.includes("API_TOKEN")
      ? "The server has no API token yet, so it only answers browsers on its own machine. " + serverSays
      : "You are not on the server's own machine, so the server wants its API token (API_TOKEN) before it shows or sends anything.";
    setText("auth-why", why);
    setText("auth-error", hadToken ? "That token is not valid: the server refused it. Check it and try again." : "");
    $("token").setAttribute("aria-invalid", hadToken ? "true" : "false");
    afterToken = route;
    $("token").focus();
  }

  $("auth-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) {
      setText("auth-error", "Enter the token first.");
      $("token").setAttribute("aria-invalid", "true");
      return;
    }
    token = value;
    $("auth-submit").disabled = true;
    setText("auth-error", "");
    try {
      await api("/api/messages?limit=1");
    } catch (err) {
      if (!(err instanceof TokenNeeded)) {
        token = null;
        setText("auth-error", err.message);
      }
      return;
    } finally {
      $("auth-submit").disabled = false;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    $("token").setAttribute("aria-invalid", "false");
    $("auth").hidden = true;
    $("forget-token").hidden = false;
    const next = afterToken || route;
    afterToken = null;
    next();
  });

  $("forget-token").addEventListener("click", () => {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("forget-token").hidden = true;
    route();
  });

  // -- polling ---------------------------------------------------------------------------

  let generation = 0;
  let timer = null;
  let resume = null;

  function stopPolling() {
    generation += 1;
    clearTimeout(timer);
    resume = null;
  }

  // Run refresh() now and again after the delay it returns (null: not again), while this
  // view stays on screen; hidden tabs do not poll.
  function poll(refresh) {
    stopPolling();
    const mine = generation;
    const tick = async () => {
      if (mine !== generation) return;
      if (document.hidden) {
        resume = tick;
        return;
      }
      let delay = null;
      try {
        delay = await refresh();
        showProblem("");
      } catch (err) {
        if (err instanceof TokenNeeded) return;
        reportError(err);
        delay = SLOW;
      }
      if (mine === generation && delay !== null) timer = setTimeout(tick, delay);
    };
    return tick();
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && resume) {
      const tick = resume;
      resume = null;
      tick();
    }
  });

  // -- messages ------------------------------------------------------------------------

  function recipientsText(record) {
    return record.recipients.map((r) => r.address).join(", ");
  }

  function statusCell(record) {
    const cell = el("td", { className: "status", "data-label": "Status" }, badge(record.status));
    if (["retrying", "partial", "failed"].includes(record.status) && record.last_error) {
      cell.append(el("span", { className: "reason", text: record.last_error.message }));
    }
    if (record.status === "retrying" && record.next_attempt_at) {
      const next = el("span", { className: "reason" }, "next try ", timeNode(record.next_attempt_at, true));
      cell.append(next);
    }
    return cell;
  }

  function messageRow(record) {
    const link = el("a", { href: "#/messages/" + record.id, text: record.subject || "(no subject)" });
    return el(
      "tr",
      { dataset: { id: record.id, status: record.status } },
      statusCell(record),
      el("td", { className: "subject", "data-label": "Subject" }, link),
      el("td", { className: "addresses", "data-label": "To", text: recipientsText(record) }),
      el("td", { className: "when", "data-label": "Queued" }, timeNode(record.created_at, true)),
    );
  }

  // Keyed update: rows keep their place (and focus) unless they changed.
  function renderMessages(records) {
    const body = $("messages").tBodies[0];
    const existing = new Map([...body.rows].map((row) => [row.dataset.id, row]));
    let delivered = false;
    records.forEach((record, index) => {
      const fresh = messageRow(record);
      const old = existing.get(record.id);
      let row = old;
      if (!old) {
        row = fresh;
      } else if (old.dataset.version !== record.updated_at) {
        delivered = delivered || (record.status === "sent" && old.dataset.status !== "sent");
        old.replaceChildren(...fresh.childNodes);
        old.dataset.status = record.status;
      }
      row.dataset.version = record.updated_at;
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
      existing.delete(record.id);
    });
    for (const row of existing.values()) row.remove();
    $("messages-empty").hidden = records.length > 0;
    if (delivered) refreshMode(); // the outbox count in the header
  }

  async function refreshMessages() {
    const status = $("status-filter").value;
    const query = "?limit=" + LIST_LIMIT + (status ? "&status=" + encodeURIComponent(status) : "");
    const data = await api("/api/messages" + query);
    renderMessages(data.messages);
    setText("messages-empty", status ? "No " + status + " messages." : "No messages yet.");
    const moving = data.messages.some((m) => !FINAL.has(m.status));
    setText(
      "messages-note",
      moving ? "Updating every second while a message is on its way." : "Updated every 10 seconds.",
    );
    return moving ? FAST : SLOW;
  }

  $("status-filter").addEventListener("change", () => poll(refreshMessages));

  // -- sending -------------------------------------------------------------------------

  const FIELDS = ["to", "subject", "text", "html"];

  // Addresses separated by commas, semicolons or new lines, not inside "..." or <...>.
  function splitAddresses(value) {
    const out = [];
    let current = "";
    let quoted = false;
    let angle = false;
    for (const ch of value) {
      if (ch === '"') quoted = !quoted;
      else if (!quoted && ch === "<") angle = true;
      else if (!quoted && ch === ">") angle = false;
      if (!quoted && !angle && (ch === "," || ch === ";" || ch === "\n")) {
        if (current.trim()) out.push(current.trim());
        current = "";
        continue;
      }
      current += ch;
    }
    if (current.trim()) out.push(current.trim());
    return out;
  }

  function fieldError(field, message) {
    const target = FIELDS.includes(field) ? field : null;
    if (!target) return false;
    setText(target + "-error", message);
    $(target).setAttribute("aria-invalid", "true");
    $(target).focus();
    return true;
  }

  function clearFieldErrors() {
    for (const field of FIELDS) {
      setText(field + "-error", "");
      $(field).removeAttribute("aria-invalid");
    }
  }

  let sending = false;

  $("send-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (sending) return;
    clearFieldErrors();
    const result = $("send-result");
    result.className = "result";
    const to = splitAddresses($("to").value);
    if (to.length === 0) {
      fieldError("to", "Give at least one address.");
      return;
    }
    const body = { to: to.length === 1 ? to[0] : to, subject: $("subject").value, text: $("text").value };
    if ($("html").value.trim()) body.html = $("html").value;
    sending = true;
    $("send").disabled = true;
    result.textContent = "Sending…";
    try {
      const answer = await api("/api/messages", { method: "POST", body });
      result.replaceChildren(
        "Queued: ",
        el("a", { href: "#/messages/" + answer.id }, el("code", { text: answer.id })),
      );
      if ($("status-filter").value) $("status-filter").value = "";
      poll(refreshMessages);
    } catch (err) {
      if (err instanceof TokenNeeded) {
        result.textContent = "";
        return;
      }
      result.className = "result error";
      const named = err instanceof ApiError && fieldError(err.field, err.message);
      result.textContent = named ? "Not sent: see " + err.field + " above." : "Not sent: " + err.message;
    } finally {
      sending = false;
      $("send").disabled = false;
    }
  });

  // Ctrl+Enter (or Cmd+Enter) sends from any field of the form.
  $("send-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("send-form").requestSubmit();
    }
  });

  // -- one message -----------------------------------------------------------------------

  async function refreshMessage(id) {
    const record = await api("/api/messages/" + encodeURIComponent(id));
    setText("m-subject", record.subject || "(no subject)");
    const status = $("m-status");
    status.className = "badge st-" + record.status;
    status.textContent = record.status;
    setText("m-id", record.id);
    $("m-created").replaceChildren(timeNode(record.created_at));
    $("m-updated").replaceChildren(timeNode(record.updated_at));
    setText("m-attempts", record.attempts);
    const next = record.status === "retrying" && record.next_attempt_at;
    $("m-next-label").hidden = $("m-next").hidden = !next;
    $("m-next").replaceChildren(next ? timeNode(record.next_attempt_at) : "");
    const error = record.last_error;
    $("m-error-label").hidden = $("m-error").hidden = !error;
    setText("m-error", error ? (error.code ? error.code + " " : "") + error.message : "");

    $("m-recipients").tBodies[0].replaceChildren(
      ...record.recipients.map((r) =>
        el(
          "tr",
          {},
          el("td", { "data-label": "Address", text: r.address }),
          el("td", { "data-label": "Status" }, badge(r.status)),
          el("td", {
            "data-label": "Answer",
            text: r.code || r.message ? [r.code, r.message].filter(Boolean).join(" ") : "—",
          }),
        ),
      ),
    );
    $("m-history").replaceChildren(
      ...record.history.map((entry) =>
        el(
          "li",
          {},
          badge(String(entry.status)),
          timeNode(entry.at),
          entry.detail ? el("span", { className: "detail", text: String(entry.detail) }) : null,
        ),
      ),
    );
    $("m-outbox").hidden = true;
    if (record.status === "sent") findInOutbox(record.id).catch(reportError);
    return FINAL.has(record.status) ? null : FAST;
  }

  async function findInOutbox(id) {
    const data = await api("/api/outbox?limit=5&message_id=" + encodeURIComponent(id));
    const mail = data.enabled && data.mails[0];
    $("m-outbox").hidden = !mail;
    if (mail) $("m-outbox-link").setAttribute("href", "#/outbox/" + encodeURIComponent(mail.name));
  }

  // -- dead letters ----------------------------------------------------------------------

  let deadIds = [];

  function deadRow(letter) {
    const button = el("button", {
      type: "button",
      className: "small",
      "aria-label": "Re-queue message " + letter.id,
      text: "Re-queue",
    });
    button.addEventListener("click", () => requeue({ ids: [letter.id] }, button));
    const reason = el("td", { "data-label": "Reason" });
    if (letter.smtp_code) reason.append(el("strong", { text: letter.smtp_code + " " }));
    reason.append(letter.error);
    return el(
      "tr",
      { dataset: { id: letter.id } },
      el(
        "td",
        { "data-label": "Message" },
        el("a", { href: "#/messages/" + encodeURIComponent(letter.id) }, el("code", { text: letter.id })),
      ),
      el("td", { className: "when", "data-label": "Failed", text: letter.failed_at }),
      reason,
      el("td", {}, button),
    );
  }

  function renderDead(letters) {
    deadIds = letters.map((l) => l.id);
    $("dead").tBodies[0].replaceChildren(...letters.map(deadRow));
    $("dead-empty").hidden = letters.length > 0;
    $("requeue-all").hidden = letters.length === 0;
    $("requeue-all").textContent = "Re-queue all (" + letters.length + ")";
    $("requeue-all-confirm").hidden = true;
    const count = $("dead-count");
    count.textContent = String(letters.length);
    count.hidden = letters.length === 0;
  }

  async function refreshDead() {
    const data = await api("/api/dead-letters");
    renderDead(data.dead_letters);
    return null; // a listing holds the queue for a moment: only on request
  }

  async function requeue(body, button) {
    const result = $("dead-result");
    result.className = "result";
    if (button) button.disabled = true;
    result.textContent = "Re-queueing…";
    try {
      const answer = await api("/api/dead-letters/requeue", { method: "POST", body });
      const parts = ["Re-queued " + answer.requeued.length + " message(s)."];
      if (answer.kept.length) parts.push("Kept (their records cannot be updated now): " + answer.kept.join(", ") + ".");
      if (answer.missing.length) parts.push("No longer in the queue: " + answer.missing.join(", ") + ".");
      result.textContent = parts.join(" ");
      if (answer.kept.length || answer.missing.length) result.className = "result error";
      renderDead(answer.dead_letters.filter((letter) => !letter.requeued));
    } catch (err) {
      if (err instanceof TokenNeeded) return;
      result.className = "result error";
      result.textContent = "Not re-queued: " + err.message;
      if (button) button.disabled = false;
    }
  }

  $("dead-refresh").addEventListener("click", () => {
    setText("dead-result", "");
    poll(refreshDead);
  });
  $("requeue-all").addEventListener("click", () => {
    setText("requeue-all-question", "Send all " + deadIds.length + " dead letters again?");
    $("requeue-all-confirm").hidden = false;
    $("requeue-all-yes").focus();
  });
  $("requeue-all-no").addEventListener("click", () => {
    $("requeue-all-confirm").hidden = true;
    $("requeue-all").focus();
  });
  $("requeue-all-yes").addEventListener("click", () => {
    $("requeue-all-confirm").hidden = true;
    requeue({ all: true }, $("requeue-all"));
  });

  // -- the outbox ------------------------------------------------------------------------

  function outboxMode(data) {
    const mode = $("mode");
    mode.hidden = false;
    mode.textContent = data.enabled ? "local capture: nothing leaves this machine" : "sending for real";
    const count = $("outbox-count");
    count.textContent = String(data.total);
    count.hidden = !data.enabled || data.total === 0;
  }

  // The mode (capture or real SMTP) and the outbox count, for the header.
  function refreshMode() {
    api("/api/outbox?limit=1").then(outboxMode, () => {});
  }

  function outboxRow(mail) {
    const href = "#/outbox/" + encodeURIComponent(mail.name);
    return el(
      "tr",
      { dataset: { name: mail.name } },
      el("td", { className: "when", "data-label": "Captured" }, timeNode(mail.captured_at, true)),
      el("td", { className: "subject", "data-label": "Subject" }, el("a", { href, text: mail.subject || "(no subject)" })),
      el("td", { className: "addresses", "data-label": "From", text: mail.from }),
      el("td", { className: "addresses", "data-label": "To", text: mail.to }),
    );
  }

  async function refreshOutbox() {
    const data = await api("/api/outbox?limit=100");
    outboxMode(data);
    $("outbox-off").hidden = data.enabled;
    $("outbox-on").hidden = !data.enabled;
    if (!data.enabled) {
      setText("outbox-off", "The outbox is off. " + data.reason);
      setText("outbox-dir", "");
      return null;
    }
    setText("outbox-dir", data.directory);
    const body = $("outbox").tBodies[0];
    const shown = [...body.rows].map((row) => row.dataset.name).join("/");
    if (shown !== data.mails.map((m) => m.name).join("/")) body.replaceChildren(...data.mails.map(outboxRow));
    $("outbox-empty").hidden = data.mails.length > 0;
    setText(
      "outbox-note",
      data.total > data.mails.length ? "The newest " + data.mails.length + " of " + data.total + " mails." : "",
    );
    return OUTBOX_EVERY;
  }

  let openMail = null;

  async function showMail(name) {
    const mail = await api("/api/outbox/" + encodeURIComponent(name));
    openMail = mail.name;
    setText("mail-subject", mail.subject || "(no subject)");
    setText("mail-from", mail.from);
    setText("mail-to", mail.to);
    setText("mail-date", mail.date || "—");
    $("mail-captured").replaceChildren(timeNode(mail.captured_at));
    $("mail-message").replaceChildren(
      mail.message_id
        ? el("a", { href: "#/messages/" + mail.message_id }, el("code", { text: mail.message_id }))
        : "—",
    );
    const frame = $("mail-preview");
    frame.hidden = mail.html === null;
    $("mail-no-html").hidden = mail.html !== null;
    frame.srcdoc = previewPolicy.createHTML(
      mail.html === null
        ? ""
        : '<!doctype html><meta http-equiv="Content-Security-Policy" content="' +
            PREVIEW_CSP +
            '"><meta name="referrer" content="no-referrer"><base target="_blank">' +
            mail.html,
    );
    setText("mail-text", mail.text === null ? "(This mail has no text part.)" : mail.text);
    $("mail-headers").tBodies[0].replaceChildren(
      ...mail.headers.map((h) => el("tr", {}, el("th", { scope: "row", text: h.name }), el("td", { text: h.value }))),
    );
    $("mail-attachments-box").hidden = mail.attachments.length === 0;
    $("mail-attachments").replaceChildren(
      ...mail.attachments.map((a) =>
        el("li", { text: (a.filename || "(no name)") + " — " + a.content_type + ", " + a.size + " bytes" }),
      ),
    );
    selectTab(mail.html === null ? "text" : "html", false);
    return null;
  }

  const TABS = ["html", "text", "headers"];

  function selectTab(name, focus) {
    for (const tab of TABS) {
      const selected = tab === name;
      const button = $("tab-" + tab);
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      $("panel-" + tab).hidden = !selected;
      if (selected && focus) button.focus();
    }
  }

  for (const tab of TABS) {
    $("tab-" + tab).addEventListener("click", () => selectTab(tab, false));
    $("tab-" + tab).addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      selectTab(TABS[(TABS.indexOf(tab) + step + TABS.length) % TABS.length], true);
    });
  }

  $("mail-download").addEventListener("click", async () => {
    if (!openMail) return;
    try {
      const response = await api("/api/outbox/" + encodeURIComponent(openMail) + "/raw", { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const link = el("a", { href: url, download: openMail });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) {
      reportError(err);
    }
  });

  // -- routing ---------------------------------------------------------------------------

  const VIEWS = {
    messages: { view: "view-messages", nav: "messages", run: () => poll(refreshMessages) },
    message: { view: "view-message", nav: "messages", run: (id) => poll(() => refreshMessage(id)) },
    dead: { view: "view-dead", nav: "dead", run: () => poll(refreshDead) },
    outbox: { view: "view-outbox", nav: "outbox", run: () => poll(refreshOutbox) },
    mail: { view: "view-mail", nav: "outbox", run: (name) => poll(() => showMail(name)) },
  };

  function parseRoute() {
    const parts = location.hash.replace(/^#\/?/, "").split("/");
    const arg = parts[1] ? decodeURIComponent(parts.slice(1).join("/")) : null;
    if (parts[0] === "messages" && arg) return ["message", arg];
    if (parts[0] === "outbox" && arg) return ["mail", arg];
    if (parts[0] in VIEWS && parts[0] !== "message" && parts[0] !== "mail") return [parts[0], null];
    return ["messages", null];
  }

  let started = false;

  async function route() {
    if (!$("auth").hidden && !token) return; // still waiting for a token
    const [name, arg] = parseRoute();
    const entry = VIEWS[name];
    showProblem("");
    for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== entry.view;
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (link.dataset.nav === entry.nav) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    $("forget-token").hidden = !token;
    if (started && name !== "messages") $("main").focus();
    started = true;
    if (name !== "outbox") refreshMode();
    await entry.run(arg);
  }

  window.addEventListener("hashchange", route);
  route();
})();

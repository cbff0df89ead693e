"use strict";
// The p2pim app's page: one WebSocket to the local app (token in every request), events in
// the same JSON as `p2pim listen --json`. No framework: a few functions that redraw lists.
(() => {
  const token = new URLSearchParams(location.search).get("t") || "";
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null) e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  };
  let ws = null, nextId = 1, state = null, current = null;  // current: {peer, name, group}
  const waiting = new Map();
  const transfers = new Map();  // file id -> row data

  function connect() {
    ws = new WebSocket(`ws://${location.host}/ws?t=${encodeURIComponent(token)}`);
    ws.onopen = () => { setConn(true); refresh(); };
    ws.onclose = () => { setConn(false); setTimeout(connect, 1000 + Math.random() * 1000); };
    ws.onmessage = (m) => {
      const data = JSON.parse(m.data);
      if (data.id !== undefined && waiting.has(data.id)) {
        const [ok, fail] = waiting.get(data.id); waiting.delete(data.id);
        data.error !== undefined ? fail(new Error(data.error)) : ok(data.ok);
      } else if (data.event) onEvent(data);
    };
  }
  function ask(op, args = {}) {
    return new Promise((ok, fail) => {
      const id = nextId++;
      waiting.set(id, [ok, fail]);
      ws.send(JSON.stringify({ id, op, ...args }));
    });
  }
  function setConn(up) {
    const c = $("conn");
    c.textContent = up ? "connected" : "reconnecting…";
    c.className = "badge" + (up ? " direct" : " warn");
  }
  function problem(text) {
    const w = $("warning"); w.hidden = false; w.replaceChildren(el("span", {}, text));
    setTimeout(() => { if (w.textContent === text) w.hidden = true; }, 6000);
  }

  // -- the left column ------------------------------------------------------------------
  let refreshing = null;
  function refresh() {
    if (refreshing) return;
    refreshing = setTimeout(async () => {
      refreshing = null;
      try { state = await ask("state"); draw(); } catch (e) { problem(e.message); }
    }, 120);
  }
  function pathBadge(b) {
    if (b.presence === "offline") return el("span", { class: "badge" }, "offline");
    if (b.path && b.path.via === "direct") {
      const rtt = b.path.rtt_ms != null ? ` ${b.path.rtt_ms.toFixed(1)} ms` : "";
      return el("span", { class: "badge direct", title: "a punched direct path" }, `direct ${b.path.addr}${rtt}`);
    }
    return el("span", { class: "badge", title: "through the rendezvous's relay" }, "relay");
  }
  function draw() {
    $("me").textContent = `${state.me} on ${state.server}`;
    $("fingerprint").textContent = state.fingerprint;
    const buddies = $("buddies"), requests = $("requests");
    buddies.replaceChildren(); requests.replaceChildren();
    for (const b of state.buddies) {
      if (b.state !== "buddy") {
        const asks = b.state.startsWith("asks");
        requests.append(el("li", { "data-user": b.name }, el("span", { class: "name" }, b.name), " ",
          asks ? el("button", { onclick: () => buddy("accept", b.name) }, "Accept") : el("span", { class: "badge" }, "asked"),
          asks ? el("button", { onclick: () => buddy("decline", b.name) }, "Decline") : ""));
        continue;
      }
      const li = el("li", { role: "option", tabindex: "0", "data-peer": b.name,
                            "aria-selected": current && current.peer === b.name ? "true" : "false",
                            "aria-label": `${b.name}, ${b.presence}${b.unread ? `, ${b.unread} unread` : ""}` },
        el("span", { class: `dot ${b.presence}` }), el("span", { class: "name" }, b.name), pathBadge(b),
        b.unread ? el("span", { class: "unread" }, b.unread) : "",
        b.key_warning ? el("span", { class: "badge warn" }, "key changed") : "");
      li.onclick = () => open(b.name, b.name, false);
      li.onkeydown = (e) => { if (e.key === "Enter") open(b.name, b.name, false); };
      buddies.append(li);
    }
    $("requests-box").hidden = !requests.children.length;
    const groups = $("groups");
    groups.replaceChildren();
    for (const g of state.groups) {
      const li = el("li", { role: "option", tabindex: "0", "data-peer": g.peer,
                            "aria-selected": current && current.peer === g.peer ? "true" : "false" },
        el("span", { class: "name" }, `#${g.name}`),
        el("span", { class: "badge" }, `${g.members.filter((m) => m.role !== "invited").length} members`),
        g.role === "invited" ? el("span", { class: "badge warn" }, "invited") : "",
        g.unread ? el("span", { class: "unread" }, g.unread) : "");
      li.onclick = () => open(g.peer, `#${g.name}`, g);
      li.onkeydown = (e) => { if (e.key === "Enter") open(g.peer, `#${g.name}`, g); };
      groups.append(li);
    }
    const lan = $("lan");
    lan.replaceChildren();
    for (const p of state.lan || []) {
      const li = el("li", { role: "option", tabindex: "0", "data-peer": p.peer,
                            "aria-selected": current && current.peer === p.peer ? "true" : "false" },
        el("span", { class: `dot ${p.away ? "away" : "online"}` }), el("span", { class: "name" }, p.name),
        el("span", { class: p.encrypted ? "badge direct" : "badge warn",
                     title: p.encrypted ? "p2pim: end-to-end encrypted" : `${p.client}: not encrypted` },
           p.encrypted ? "LAN" : `${p.client}, unencrypted`),
        p.unread ? el("span", { class: "unread" }, p.unread) : "");
      li.onclick = () => open(p.peer, p.name, false);
      li.onkeydown = (e) => { if (e.key === "Enter") open(p.peer, p.name, false); };
      lan.append(li);
    }
    $("lan-box").hidden = !lan.children.length;
    if (current) showPeerInfo();
  }
  async function buddy(action, user) {
    try { await ask("buddy", { action, user }); refresh(); } catch (e) { problem(e.message); }
  }

  // -- a conversation --------------------------------------------------------------------
  const MARKS = { queued: "…", relayed: "✓", stored: "✓", delivered: "✓✓", read: "✓✓ read", failed: "✗ failed" };
  function mark(stateName) {
    return el("span", { class: `mark ${stateName}`, "data-state": stateName, title: stateName }, MARKS[stateName] || stateName);
  }
  function bubble(m) {
    const time = new Date(m.sent_at_ms).toLocaleTimeString();
    const li = el("li", { class: m.outgoing ? "mine" : "", "data-msg": m.msg_id });
    if (current && current.group && !m.outgoing) li.append(el("span", { class: "author" }, m.author || "?"));
    li.append(el("span", { class: "text" }, m.text));
    li.append(el("span", { class: "meta" }, time, m.outgoing ? mark(m.state) : ""));
    return li;
  }
  async function open(peer, name, group) {
    current = { peer, name, group };
    $("tab-chats").click();
    $("peer-name").textContent = name;
    $("composer").hidden = false;
    $("messages").replaceChildren();
    drawFiles();
    showPeerInfo();
    try {
      const rows = await ask("history", { peer, limit: 200 });
      if (!current || current.peer !== peer) return;
      $("messages").replaceChildren(...rows.map(bubble));
      scrollDown();
      await ask("open", { peer });
      refresh();
    } catch (e) { problem(e.message); }
    $("text").focus();
  }
  function showPeerInfo() {
    const info = $("peer-info"), warn = $("warning"), invite = $("invite");
    invite.hidden = true;
    if (!state || !current) return;
    if (current.group) {
      const g = state.groups.find((x) => x.peer === current.peer) || current.group;
      info.textContent = g.members.map((m) => m.role === "member" ? m.name : `${m.name} (${m.role})`).join(", ");
      if (g.role === "invited") {
        invite.hidden = false;
        invite.replaceChildren(`You are invited to #${g.name}. `,
          el("button", { onclick: () => groupAnswer(g, "accept") }, "Join"),
          el("button", { onclick: () => groupAnswer(g, "decline") }, "Decline"));
      }
      return;
    }
    const b = state.buddies.find((x) => x.name === current.peer);
    if (!b) return;
    info.replaceChildren(pathBadge(b), ` fingerprint ${b.fingerprint}`);
    if (b.key_warning) showKeyWarning(b.name, b.fingerprint, b.offered);
  }
  function showKeyWarning(user, pinned, offered) {
    const w = $("warning");
    w.hidden = false;
    w.setAttribute("data-key-warning", user);
    w.replaceChildren(el("strong", {}, `${user}'s key changed. `),
      el("br"), `Pinned (the one you had): ${pinned}`,
      el("br"), `Offered (the new one): ${offered || "?"}`,
      el("br"), "Compare the new fingerprint with them (in person, by phone) before you trust it. ",
      el("button", { id: "trust", onclick: async () => {
        try { await ask("trust", { user }); w.hidden = true; refresh(); } catch (e) { problem(e.message); }
      } }, "I checked: trust the new key"));
  }
  async function groupAnswer(g, action) {
    try { await ask("group", { action, group: g.gid }); refresh(); } catch (e) { problem(e.message); }
  }
  function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }
  async function send() {
    const text = $("text").value;
    if (!text.trim() || !current) return;
    $("text").value = "";
    try {
      const msgId = await ask("send", { to: current.peer, text });
      if (!$("messages").querySelector(`[data-msg="${msgId}"]`)) {
        $("messages").append(bubble({ msg_id: msgId, outgoing: true, text, sent_at_ms: Date.now(), state: "queued" }));
        scrollDown();
      }
    } catch (e) { $("text").value = text; problem(e.message); }
  }
  function setMark(msgId, stateName) {
    const li = $("messages").querySelector(`[data-msg="${msgId}"] .mark`);
    if (!li) return;
    const order = ["queued", "relayed", "failed", "stored", "delivered", "read"];
    if (order.indexOf(stateName) > order.indexOf(li.dataset.state)) li.replaceWith(mark(stateName));
  }

  // -- files --------------------------------------------------------------------------------
  function drawFiles() {
    const list = $("files");
    list.replaceChildren();
    if (!current || current.group) return;
    for (const t of transfers.values()) {
      if (t.peer !== current.peer || t.hidden) continue;
      const pct = t.size ? Math.floor((100 * t.done) / t.size) : 100;
      const li = el("li", { "data-file": t.id },
        el("span", { class: "name" }, t.name), ` ${t.outgoing ? "to" : "from"} ${t.peer} — `,
        el("span", { class: "file-state" }, t.state), " ",
        el("progress", { max: "100", value: String(pct), "aria-label": `${t.name} ${pct}%` }),
        el("span", { class: "pct" }, `${pct}%`));
      if (t.state === "offered" && !t.outgoing) {
        li.append(el("button", { class: "accept", onclick: () => fileAction(t, "accept") }, "Accept"),
                  el("button", { class: "decline", onclick: () => fileAction(t, "decline") }, "Decline"));
      }
      if (t.path) li.append(el("div", { class: "meta" }, t.path));
      list.append(li);
    }
  }
  async function fileAction(t, action) {
    try { const r = await ask("file", { action, file_id: t.id }); t.state = r.state; drawFiles(); }
    catch (e) { problem(e.message); }
  }
  function fileEvent(d) {
    const t = transfers.get(d.id) || { id: d.id, peer: d.peer, name: d.name, size: d.size || 0, done: 0,
                                        outgoing: !!d.outgoing, state: "offered" };
    if (d.size !== undefined) t.size = d.size;
    if (d.event === "file_offered") t.state = "offered";
    if (d.event === "file_progress") { t.done = d.done; t.state = "moving"; }
    if (d.event === "file_answered") t.state = d.kind;
    if (d.event === "file_done") { t.done = t.size; t.state = "done"; t.path = d.path; }
    if (d.event === "file_failed") { t.state = `failed: ${d.reason}`; }
    transfers.set(d.id, t);
    drawFiles();
    if (d.event === "file_offered") notify(`${d.peer} offers a file`, d.name);
  }
  async function upload(file) {
    if (!current || current.group) { problem("drop a file on a buddy's conversation"); return; }
    const body = new FormData();
    body.append("file", file, file.name);
    const url = `/upload?to=${encodeURIComponent(current.peer)}&t=${encodeURIComponent(token)}`;
    try {
      const r = await (await fetch(url, { method: "POST", body, headers: { "X-P2PIM-Token": token } })).json();
      if (r.error) throw new Error(r.error);
      const t = r.ok;  // a transfer as `p2pim files --json` shows it
      transfers.set(t.id, { id: t.id, peer: t.peer, name: t.name, size: t.size, done: 0,
                                 outgoing: true, state: t.state });
      drawFiles();
    } catch (e) { problem(e.message); }
  }

  // -- events ----------------------------------------------------------------------------
  function notify(title, body) {
    if (document.visibilityState === "visible" || !("Notification" in window)) return;
    if (Notification.permission === "granted") new Notification(title, { body });
  }
  function onEvent(d) {
    switch (d.event) {
      case "message":
        if (current && current.peer === d.from && !$("messages").querySelector(`[data-msg="${d.msg_id}"]`)) {
          $("messages").append(bubble({ ...d, outgoing: false })); scrollDown();
        } else notify(`${d.from}`, d.text);
        refresh(); break;
      case "group_message": {
        const peer = `#${d.gid}`;
        if (current && current.peer === peer && !$("messages").querySelector(`[data-msg="${d.msg_id}"]`)) {
          $("messages").append(bubble({ ...d, outgoing: false, author: d.from })); scrollDown();
        } else notify(`#${d.group} ${d.from}`, d.text);
        refresh(); break;
      }
      case "sent_elsewhere":
        if (current && current.peer === d.to) { $("messages").append(bubble({ ...d, outgoing: true, state: "stored" })); scrollDown(); }
        break;
      case "receipt": for (const m of d.msg_ids) setMark(m, d.kind); break;
      case "outcome": setMark(d.msg_id, d.state); if (d.state === "failed") problem(`not sent: ${d.detail}`); break;
      case "key_changed":
        refresh();
        if (!current || current.peer === d.user) showKeyWarning(d.user, d.pinned, d.offered);
        break;
      case "file_offered": case "file_progress": case "file_answered": case "file_done": case "file_failed":
        fileEvent(d); break;
      case "device_linked": $("link-code").textContent = `Linked: ${d.name} (device ${d.device_id})`; devices(); break;
      case "link_failed": $("link-code").textContent = `Link failed: ${d.reason}`; break;
      case "problem": problem(d.message); break;
      default: refresh();
    }
  }

  // -- devices and account ---------------------------------------------------------------
  async function devices() {
    try {
      const list = await ask("devices");
      $("device-list").replaceChildren(...list.map((d) => el("li", {},
        `${d.device_id} ${d.name} — ${d.online ? "online" : "offline"}${d.this ? " (this one)" : ""} `,
        d.this ? "" : el("button", { onclick: async () => {
          try { await ask("devices", { action: "remove", device_id: d.device_id }); devices(); } catch (e) { problem(e.message); }
        } }, "Remove"))));
      const a = await ask("account");
      $("account-state").textContent = !a.server_mails ? "This server sends no email."
        : !a.email ? "No email address." : `${a.email} (${a.verified ? "verified" : "not verified yet"}); notices ${a.notify ? "on" : "off"}`;
    } catch (e) { problem(e.message); }
  }
  function show(screen) {
    const chats = screen === "chats";
    $("chat").hidden = !chats; $("side").hidden = !chats;
    $("devices").hidden = screen !== "devices"; $("nat").hidden = screen !== "nat";
    for (const s of ["chats", "devices", "nat"]) $(`tab-${s}`).setAttribute("aria-pressed", String(s === screen));
    if (screen === "devices") devices();
  }

  // -- the NAT page: words, a picture, the table ------------------------------------------
  function svg(tag, attrs, text) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function natPicture(r) {
    const pic = svg("svg", { viewBox: "0 0 760 150", width: "760", height: "150", role: "img" });
    const box = (x, title, line1, line2, fill = "#ffffff") => {
      pic.append(svg("rect", { x, y: 30, width: 170, height: 84, rx: 10, fill, stroke: "#667085" }),
                 svg("text", { x: x + 85, y: 56, "text-anchor": "middle", "font-weight": "600" }, title),
                 svg("text", { x: x + 85, y: 78, "text-anchor": "middle", "font-size": "12" }, line1 || ""),
                 svg("text", { x: x + 85, y: 96, "text-anchor": "middle", "font-size": "12" }, line2 || ""));
    };
    const arrow = (x1, x2) => pic.append(svg("line", { x1, y1: 72, x2, y2: 72, stroke: "#667085", "stroke-width": 2 }));
    box(10, "this computer", r.local || "?", "");
    arrow(180, 295);
    const known = r.nat_present !== null && r.nat_present !== undefined;
    const title = !known ? "a NAT?" : r.nat_present ? "your NAT" : "(no NAT)";
    box(295, title, r.label, known && r.nat_present ? `${r.mapping} / ${r.filtering}` : "",
        !known ? "#f2f4f7" : r.nat_present ? "#fff1c2" : "#e7f6ec");
    arrow(465, 580);
    box(580, "the Internet sees", r.mapped || "?", r.server ? `STUN ${r.server}` : "");
    return pic;
  }
  $("nat-run").onclick = async () => {
    $("nat-advice").textContent = "asking the STUN service…";
    try {
      const n = await ask("nat");
      $("nat-advice").textContent = `${n.report.label}: ${n.advice}`;
      $("nat-picture").replaceChildren(natPicture(n.report));
      $("nat-table").textContent = n.table;
    } catch (e) { $("nat-advice").textContent = e.message; }
  };

  // -- wiring ------------------------------------------------------------------------------
  $("tab-chats").onclick = () => show("chats");
  $("tab-devices").onclick = () => show("devices");
  $("tab-nat").onclick = () => show("nat");
  $("composer").onsubmit = (e) => { e.preventDefault(); send(); };
  $("text").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } };
  $("pick").onchange = () => { for (const f of $("pick").files) upload(f); $("pick").value = ""; };
  const comp = $("composer");
  comp.addEventListener("dragover", (e) => { e.preventDefault(); comp.classList.add("dragging"); });
  comp.addEventListener("dragleave", () => comp.classList.remove("dragging"));
  comp.addEventListener("drop", (e) => {
    e.preventDefault(); comp.classList.remove("dragging");
    for (const f of e.dataTransfer.files) upload(f);
  });
  $("add-buddy").onsubmit = (e) => { e.preventDefault(); const n = $("add-name").value.trim(); if (n) buddy("add", n); $("add-name").value = ""; };
  $("new-group").onsubmit = async (e) => {
    e.preventDefault();
    const name = $("group-name").value.trim();
    const members = $("group-members").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (!name) return;
    try { await ask("group", { action: "create", name, members }); $("group-name").value = ""; $("group-members").value = ""; refresh(); }
    catch (err) { problem(err.message); }
  };
  $("link").onclick = async () => {
    $("link-code").textContent = "asking for a code…";
    try { const r = await ask("link"); $("link-code").textContent = `On the new device run: p2pim device join ${r.code}`; }
    catch (e) { $("link-code").textContent = e.message; }
  };
  $("email-form").onsubmit = async (e) => { e.preventDefault(); try { await ask("account", { action: "email", email: $("email").value }); devices(); } catch (err) { problem(err.message); } };
  $("verify-form").onsubmit = async (e) => { e.preventDefault(); try { await ask("account", { action: "verify", code: $("code").value }); devices(); } catch (err) { problem(err.message); } };
  $("notify-on").onclick = async () => { try { await ask("account", { action: "notify", on: true }); devices(); } catch (e) { problem(e.message); } };
  $("notify-off").onclick = async () => { try { await ask("account", { action: "notify", on: false }); devices(); } catch (e) { problem(e.message); } };
  document.addEventListener("click", () => {
    if ("Notification" in window && Notification.permission === "default") Notification.requestPermission();
  }, { once: true });
  connect();
})();

// qlora-kit ui: one page, four views (#/runs, #/new, #/run/NAME, #/chat). No framework, no build
// step, nothing from a CDN. Text from runs (names, data, README, answers) is only ever set with
// textContent, never parsed as HTML.
"use strict";

const S = { csrf: null, timers: [], recipes: [], uploaded: null, checked: null, run: null };
const $ = (sel) => document.querySelector(sel);

function h(tag, attrs, ...kids) {
  const svg = ["svg", "path", "line", "text", "circle", "g", "title", "polyline"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid);
  return el;
}

// replaceChildren, minus the nulls that conditional parts leave (it would print them as "null")
function fill(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.hint = body && body.hint;
  }
}

async function api(method, url, body, raw) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = S.csrf;
  let payload;
  if (raw !== undefined) payload = raw;
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const r = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
  if (r.status === 401) { location.reload(); throw new ApiError(401, { error: "not logged in" }); }
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

function showError(box, err) {
  fill(box, ...[h("div", { text: err.message }), err.hint ? h("div", { class: "hint", text: "Fix: " + err.hint }) : null].filter(Boolean));
  box.hidden = false;
}

function flash(err) { showError($("#flash"), err); }

const fmt = {
  loss: (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(4)),
  date: (iso) => { if (!iso) return "–"; const d = new Date(iso); return isNaN(d) ? iso : d.toLocaleString(); },
  secs: (s) => {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  },
  bytes: (n) => (n > 2 ** 30 ? (n / 2 ** 30).toFixed(2) + " GiB" : n > 2 ** 20 ? (n / 2 ** 20).toFixed(1) + " MiB" : Math.ceil(n / 1024) + " KiB"),
  gib: (n) => (n / 2 ** 30).toFixed(2) + " GiB",
};

function badge(status) { return h("span", { class: "badge " + status, text: status }); }
function every(ms, fn) { fn(); S.timers.push(setInterval(fn, ms)); }
function runLink(name) { return "#/run/" + encodeURIComponent(name); }

// --- routing ------------------------------------------------------------------------------------

function route() {
  S.timers.forEach(clearInterval);
  S.timers = [];
  $("#flash").hidden = true;
  const hash = location.hash || "#/runs";
  const [, page, ...rest] = hash.split("/");
  const name = page === "run" ? decodeURIComponent(rest.join("/")) : null;
  const view = { runs: "runs", new: "new", run: "run", chat: "chat" }[page] || "runs";
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "page-" + view;
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.dataset.page === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.title = "qlora-kit · " + (name || { runs: "runs", new: "new run", chat: "try" }[view]);
  ({ runs: showRuns, new: showNew, run: () => showRun(name), chat: showChat })[view]();
}

// --- runs ---------------------------------------------------------------------------------------

function showRuns() {
  every(3000, async () => {
    let data;
    try { data = await api("GET", "/api/runs"); } catch (e) { return flash(e); }
    $("#runs-root").textContent = data.root;
    const rows = data.runs.map((r) => h("tr", {},
      h("td", { "data-label": "Run" }, h("a", { href: runLink(r.name), text: r.name })),
      h("td", { "data-label": "Status" }, badge(r.status)),
      h("td", { "data-label": "Recipe", text: r.recipe || "–" }),
      h("td", { "data-label": "Base model", text: r.base_model || "–" }),
      h("td", { "data-label": "Data", text: r.data_file || "–", title: r.data || "" }),
      h("td", { "data-label": "Steps", class: "num", text: r.steps === null || r.steps === undefined ? "–" : r.max_steps ? `${r.steps} / ${r.max_steps}` : String(r.steps) }),
      h("td", { "data-label": "Train loss", class: "num", text: fmt.loss(r.status === "running" ? r.last_loss : r.train_loss) }),
      h("td", { "data-label": "Eval loss", class: "num", text: fmt.loss(r.status === "running" ? r.last_eval_loss : r.eval_loss) }),
      h("td", { "data-label": "Started", text: fmt.date(r.started) })));
    fill($("#runs-table tbody"), ...rows);
    $("#runs-empty").hidden = rows.length > 0;
  });
}

// --- new run ------------------------------------------------------------------------------------

function fillRecipe(name) {
  const r = S.recipes.find((x) => x.name === name);
  if (!r) return;
  $("#f-recipe-desc").textContent = r.description || "";
  $("#f-base").value = r.base_model;
  $("#f-r").value = r.r;
  $("#f-lr").value = r.learning_rate;
  $("#f-epochs").value = r.epochs;
  $("#f-maxlen").value = r.max_length;
  $("#f-maxsteps").value = r.max_steps || "";
  if (!$("#f-path").value && r.data) $("#f-path").placeholder = r.data;
  invalidate();
}

function invalidate() {
  S.checked = null;
  $("#btn-start").disabled = true;
}

function formValues() {
  const upload = $("#f-src-upload").checked;
  return {
    recipe: $("#f-recipe").value,
    data: upload ? (S.uploaded || "") : $("#f-path").value.trim(),
    base_model: $("#f-base").value.trim(),
    r: $("#f-r").value, learning_rate: $("#f-lr").value.trim(), epochs: $("#f-epochs").value,
    max_length: $("#f-maxlen").value, max_steps: $("#f-maxsteps").value,
    extra: $("#f-extra").value, name: $("#f-name").value.trim(),
  };
}

async function initNew() {
  if (S.recipes.length) return;
  const data = await api("GET", "/api/recipes");
  S.recipes = data.recipes;
  fill($("#f-recipe"), ...S.recipes.map((r) => h("option", { value: r.name, text: r.name })));
  fillRecipe(S.recipes[0] && S.recipes[0].name);
  $("#f-recipe").addEventListener("change", (e) => fillRecipe(e.target.value));
  for (const el of document.querySelectorAll("#new-form input, #new-form select, #new-form textarea")) {
    el.addEventListener("input", invalidate);
  }
  const source = () => {
    const up = $("#f-src-upload").checked;
    $("#upload-field").hidden = !up;
    $("#path-field").hidden = up;
    invalidate();
  };
  $("#f-src-upload").addEventListener("change", source);
  $("#f-src-path").addEventListener("change", source);
  $("#f-file").addEventListener("change", upload);
  $("#new-form").addEventListener("submit", (e) => { e.preventDefault(); check(); });
  $("#btn-start").addEventListener("click", start);
}

async function upload() {
  const f = $("#f-file").files[0];
  S.uploaded = null;
  invalidate();
  if (!f) return;
  const st = $("#f-file-status");
  st.textContent = `uploading ${f.name} (${fmt.bytes(f.size)})…`;
  try {
    const r = await api("POST", "/api/uploads?name=" + encodeURIComponent(f.name), undefined, f);
    S.uploaded = r.path;
    st.textContent = `stored as ${r.path}`;
  } catch (e) {
    st.textContent = "";
    showError($("#check-error"), e);
  }
}

async function check() {
  const box = $("#check-error");
  box.hidden = true;
  $("#check-result").hidden = true;
  invalidate();
  const values = formValues();
  $("#check-status").textContent = "checking (reading the data, the tokenizer and the model config)…";
  $("#btn-check").disabled = true;
  try {
    const r = await api("POST", "/api/check", values);
    S.checked = values;
    renderCheck(r);
    $("#btn-start").disabled = false;
    $("#check-status").textContent = "ready to start";
  } catch (e) {
    $("#check-status").textContent = "";
    showError(box, e);
  } finally {
    $("#btn-check").disabled = false;
  }
}

function kvTable(rows) {
  return h("table", { class: "kv" }, h("tbody", {}, rows.filter(Boolean).map(([k, v]) => h("tr", {}, h("th", { scope: "row", text: k }), h("td", { text: v })))));
}

function renderCheck(r) {
  $("#check-command").textContent = r.command;
  const rep = r.report;
  const du = rep.duplicates || {};
  const sp = rep.split || {};
  const tok = rep.tokens || {};
  const L = tok.length || {};
  const rows = [
    ["file", rep.file], ["format / encoding", `${rep.format} / ${rep.encoding}`], ["layout", rep.layout],
    ["rows read", String(rep.rows_read)], ["unreadable rows skipped", String(rep.bad_rows.length)],
    ["dropped (empty question or answer)", String(rep.dropped.length)],
    ["exact duplicates", `${du.exact}` + (du.exact_dropped ? ` (${du.exact_dropped} dropped)` : "")],
    ["near duplicates", String(du.near)], ["train / eval", `${sp.train} / ${sp.eval}`],
    ["train/eval leakage", `${sp.leakage} (a plain row split would leak ${sp.leakage_with_row_split})`],
    rep.pii_redacted ? ["personal data redacted", Object.entries(rep.pii_redacted).map(([k, v]) => `${k} ${v}`).join(", ") || "none found"] : null,
    tok.skipped ? ["token lengths", "skipped: " + tok.skipped] : ["tokenizer", tok.tokenizer],
    tok.skipped ? null : ["tokens per sample", `min ${L.min} · p50 ${L.p50} · p90 ${L.p90} · p99 ${L.p99} · max ${L.max}`],
    tok.skipped ? null : [`longer than max_length ${tok.max_length}`, `${tok.truncated} (answer cut in ${tok.answer_cut})`],
  ];
  const drops = [...rep.bad_rows.map((x) => ["unreadable", x]), ...rep.dropped.map((x) => ["dropped", x])];
  const near = (du.near_examples || []).map((x) => `near duplicate ${x.row} ~ ${x.like}: ${x.question}`);
  const warnings = [...(r.warnings || []), ...(rep.warnings || [])];
  fill($("#check-report"), 
    kvTable(rows),
    drops.length ? h("h4", { text: `Rows not trained (${drops.length})` }) : null,
    drops.length ? h("ul", {}, drops.slice(0, 20).map(([k, x]) => h("li", {}, h("code", { text: x.where }), ` ${k}: ${x.reason}`))) : null,
    near.length ? h("ul", {}, near.slice(0, 5).map((t) => h("li", { text: t }))) : null,
    warnings.length ? h("ul", { class: "warnings" }, warnings.map((w) => h("li", { text: "warning: " + w }))) : null,
  );
  const p = r.plan;
  fill($("#check-plan"), p ? h("div", {},
    h("p", {}, h("strong", { text: `about ${fmt.gib(p.total)} peak` }), ` on a ${fmt.gib(p.gpu_memory)} GPU: `,
      h("span", { class: p.fits ? "" : "error", text: p.fits ? "fits" : "does not fit" })),
    kvTable(Object.entries(p.parts).map(([k, v]) => [k.replaceAll("_", " "), fmt.bytes(v)])),
    h("p", { class: "muted small", text: `largest micro-batch at max_length ${p.max_length}: ${p.best_micro_batch}; longest max_length at micro-batch 1: ${p.longest_max_length.toLocaleString()} tokens` }),
  ) : h("p", { class: "muted", text: "no estimate for this model (config not available)" }));
  const sample = rep.sample;
  fill($("#check-sample"), ...(sample ? [
    h("h3", { text: `One sample (${sample.where}); highlighted tokens carry the loss` }),
    h("div", { class: "sample" }, sample.segments.map(([text, loss]) => loss ? h("mark", { text }) : h("span", { class: "prompt", text }))),
  ] : []));
  $("#check-result").hidden = false;
}

async function start() {
  const values = formValues();
  if (!S.checked || JSON.stringify(values) !== JSON.stringify(S.checked)) return check();
  $("#btn-start").disabled = true;
  $("#check-status").textContent = "starting…";
  try {
    const r = await api("POST", "/api/start", values);
    location.hash = runLink(r.name);
  } catch (e) {
    $("#check-status").textContent = "";
    showError($("#check-error"), e);
    $("#btn-start").disabled = false;
  }
}

function showNew() { initNew().catch(flash); }

// --- one run ------------------------------------------------------------------------------------

function drawChart(svg, events) {
  const W = 900, H = 300, L = 60, R = 16, T = 14, B = 38;
  const train = events.filter((e) => typeof e.loss === "number" && typeof e.step === "number").map((e) => [e.step, e.loss]);
  const ev = events.filter((e) => typeof e.eval_loss === "number" && typeof e.step === "number").map((e) => [e.step, e.eval_loss]);
  const all = train.concat(ev);
  const kids = [h("title", { id: "chart-title", text: "Training and eval loss by step" })];
  if (!all.length) {
    kids.push(h("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty", text: "waiting for the first logged step…" }));
    fill(svg, ...kids);
    return;
  }
  const maxStep = Math.max(...events.map((e) => e.max_steps || 0), ...all.map((p) => p[0]), 1);
  let lo = Math.min(...all.map((p) => p[1])), hi = Math.max(...all.map((p) => p[1]));
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.06;
  lo -= pad; hi += pad;
  const x = (s) => L + (s / maxStep) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    kids.push(h("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    kids.push(h("text", { class: "tick", x: L - 6, y: y(v) + 4, "text-anchor": "end", text: v.toFixed(3) }));
  }
  for (let i = 0; i <= 4; i++) {
    const s = Math.round((maxStep * i) / 4);
    kids.push(h("text", { class: "tick", x: x(s), y: H - B + 16, "text-anchor": "middle", text: String(s) }));
  }
  kids.push(h("text", { class: "tick", x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", text: "optimizer step" }));
  kids.push(h("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  kids.push(h("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const path = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  if (train.length) kids.push(h("path", { class: "curve-train", d: path(train), "data-points": train.length }));
  if (ev.length) {
    kids.push(h("path", { class: "curve-eval", d: path(ev), "data-points": ev.length }));
    for (const p of ev) kids.push(h("circle", { class: "dot-eval", cx: x(p[0]), cy: y(p[1]), r: 3.5 }));
  }
  fill(svg, ...kids);
}

function stat(label, value) { return h("div", {}, h("dt", { text: label }), h("dd", { text: value })); }

function renderStats(events, summary) {
  const last = events.length ? events[events.length - 1] : {};
  const lastWith = (k) => { for (let i = events.length - 1; i >= 0; i--) if (typeof events[i][k] === "number") return events[i][k]; return null; };
  const running = summary && summary.status === "running";
  const items = [
    stat("step", last.step === undefined ? (summary && summary.steps !== null && summary.steps !== undefined ? String(summary.steps) : "–") : last.max_steps ? `${last.step} / ${last.max_steps}` : String(last.step)),
    stat("epoch", typeof last.epoch === "number" ? last.epoch.toFixed(2) : "–"),
    stat("train loss", fmt.loss(lastWith("loss"))),
    stat("eval loss", fmt.loss(lastWith("eval_loss"))),
    stat("tokens/s", lastWith("tokens_per_s") === null ? "–" : Math.round(lastWith("tokens_per_s")).toLocaleString()),
    stat("elapsed", fmt.secs(last.elapsed_s)),
    stat("ETA", running ? fmt.secs(last.eta_s) : "–"),
  ];
  const mem = lastWith("gpu_mem_gib");
  if (mem !== null) items.push(stat("GPU memory", mem.toFixed(2) + " GiB"));
  fill($("#run-stats"), ...items);
}

// a small, safe Markdown subset for the run card: headings, tables, lists, **bold**, `code`
function inline(text) {
  const out = [];
  const re = /(\*\*[^*]+\*\*|`[^`]+`)/g;
  let at = 0, m;
  while ((m = re.exec(text))) {
    if (m.index > at) out.push(document.createTextNode(text.slice(at, m.index)));
    const t = m[0];
    out.push(t.startsWith("**") ? h("strong", { text: t.slice(2, -2) }) : h("code", { text: t.slice(1, -1) }));
    at = m.index + t.length;
  }
  if (at < text.length) out.push(document.createTextNode(text.slice(at)));
  return out;
}

function markdown(md) {
  const out = [];
  const lines = md.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (/^#{1,6} /.test(line)) {
      const n = Math.min(6, line.indexOf(" ") + 2);
      out.push(h("h" + n, {}, inline(line.replace(/^#+ /, ""))));
    } else if (line.startsWith("|")) {
      const rows = [];
      while (i < lines.length && lines[i].startsWith("|")) rows.push(lines[i++]);
      i--;
      const cells = (r) => r.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const body = rows.filter((r) => !/^\|[\s:|-]+\|$/.test(r));
      out.push(h("div", { class: "table-wrap" }, h("table", {}, h("tbody", {}, body.map((r) => h("tr", {}, cells(r).map((c) => h("td", {}, inline(c)))))))));
    } else if (/^[-*] /.test(line)) {
      const items = [];
      while (i < lines.length && /^[-*] /.test(lines[i])) items.push(lines[i++].slice(2));
      i--;
      out.push(h("ul", {}, items.map((t) => h("li", {}, inline(t)))));
    } else if (line.trim()) {
      out.push(h("p", {}, inline(line)));
    }
  }
  return out;
}

function renderJobs(jobs) {
  const box = $("#jobs");
  const kids = jobs.map((j) => h("div", { class: "job" },
    h("h3", {}, `${j.kind} `, badge(j.state), j.state === "running" ? null :
      h("button", { type: "button", "aria-label": `dismiss the ${j.kind} job`, onclick: (e) => forgetJob(j.kind, e.target), text: "Dismiss" })),
    h("p", { class: "small" }, h("code", { text: "$ " + j.command })),
    j.result && j.result.rel ? h("p", {}, h("a", { href: fileUrl(S.run, j.result.rel), text: `download ${j.result.rel}${j.result.dir ? " (zip)" : ""}` })) : null,
    j.result && !j.result.rel ? h("p", { text: "wrote " + j.result.path }) : null,
    j.log ? h("pre", { text: j.log, "aria-label": j.kind + " log" }) : null));
  fill(box, ...(kids.length ? [h("h2", { text: "Jobs" }), ...kids] : []));
  for (const pre of box.querySelectorAll("pre")) pre.scrollTop = pre.scrollHeight;  // the latest lines
}

async function forgetJob(kind, button) {
  button.disabled = true;
  try { await api("DELETE", `/api/run/job?name=${encodeURIComponent(S.run)}&kind=${kind}`); } catch (e) { flash(e); }
  refreshRun(S.run);
}

function fileUrl(run, rel) { return "/api/run/file?name=" + encodeURIComponent(run) + "&path=" + encodeURIComponent(rel); }

async function refreshRun(name) {
  let d;
  try { d = await api("GET", "/api/run?name=" + encodeURIComponent(name)); } catch (e) { flash(e); return null; }
  if (S.run !== name) return null;
  const s = d.summary || {};
  $("#run-status").replaceWith(Object.assign(badge(s.status || "unknown"), { id: "run-status" }));
  $("#run-sub").textContent = d.pending ? "the training process is starting (reading the data, loading the model)…" :
    [s.recipe && "recipe " + s.recipe, s.base_model && "base " + s.base_model, s.data_file && "data " + s.data_file,
     s.started && "started " + fmt.date(s.started)].filter(Boolean).join(" · ");
  // run.json says "interrupted" while the process is still writing its checkpoint and exiting:
  // Resume only once it is gone (train refuses a second process on the same run directory)
  const train = (d.jobs || []).find((j) => j.kind === "train");
  const alive = !!(train && train.state === "running");
  const canResume = ["interrupted", "failed"].includes(s.status) && !d.pending && !alive;
  const stopBtn = $("#btn-stop");
  const exiting = alive && s.status === "interrupted";
  // the process table, not only run.json, says whether there is something to stop
  stopBtn.hidden = !(["running", "starting"].includes(s.status) || (alive && s.status !== "finished"));
  stopBtn.dataset.now = d.stopping || exiting ? "1" : "";
  stopBtn.textContent = exiting ? "Saving the checkpoint and exiting… (quit now)" :
    d.stopping ? "Stopping after this step… (quit now)" : "Stop (save a checkpoint)";
  $("#btn-resume").hidden = !canResume;
  const err = d.info && d.info.error;
  const box = $("#run-error");
  if (err && s.status !== "running") {
    box.className = s.status === "interrupted" ? "note-box" : "error-box";
    fill(box, ...[h("div", { text: err }), canResume ? h("div", { class: "hint", text: "Resume runs this command: " + d.resume_command }) : null].filter(Boolean));
    box.hidden = false;
  } else box.hidden = true;
  const done = s.status === "finished";
  $("#run-after").hidden = !done;
  if (done) {
    $("#report-link").hidden = !d.report;
    $("#report-link").href = "/run/report?name=" + encodeURIComponent(name);
    fill($("#artifacts"), ...(d.artifacts || []).map((a) => h("li", {},
      h("a", { href: fileUrl(name, a.rel), text: a.rel + (a.dir ? " (folder, as zip)" : "") }), ` ${fmt.bytes(a.bytes)}`)));
    const ev = d.eval;
    fill($("#eval-summary"), ...(ev ? [h("h3", { text: "Evaluation (base → tuned)" }),
      kvTable(Object.keys(ev.tuned || {}).map((k) => [k, `${fmtNum(ev.base[k])} → ${fmtNum(ev.tuned[k])}`]))] : []));
  }
  fill($("#run-card"), ...(d.readme ? markdown(d.readme) : [h("p", { class: "muted", text: "no run card yet" })]));
  $("#run-recipe").textContent = d.recipe_yaml || "";
  renderJobs(d.jobs || []);
  return d;
}

function fmtNum(v) { return typeof v === "number" ? (Math.abs(v) < 100 ? v.toFixed(3) : Math.round(v).toLocaleString()) : "–"; }

function showRun(name) {
  S.run = name;
  $("#run-name").textContent = name;
  fill($("#run-card"), );
  fill($("#jobs"), );
  $("#run-after").hidden = true;
  const events = [];
  let offset = 0, status = null, detailAt = 0;
  const svg = $("#chart");
  drawChart(svg, events);
  renderStats(events, null);
  let inFlight = false;
  const tick = async () => {
    if (inFlight) return;  // a slow answer must not let two polls append the same lines twice
    inFlight = true;
    try { await poll(); } finally { inFlight = false; }
  };
  const poll = async () => {
    let p;
    try { p = await api("GET", `/api/run/progress?name=${encodeURIComponent(name)}&offset=${offset}`); } catch (e) { return; }
    if (S.run !== name) return;
    if (p.offset < offset) { events.length = 0; }  // the file was replaced (a run started over)
    events.push(...p.events);
    offset = p.offset;
    drawChart(svg, events);
    const newStatus = p.summary ? p.summary.status : (p.job && p.job.state === "running" ? "starting" : "failed");
    renderStats(events, p.summary);
    const busy = ["running", "starting"].includes(newStatus) || !!(p.job && p.job.state === "running");
    const now = Date.now();
    if (newStatus !== status || now - detailAt > (busy ? 2500 : 4000)) {
      status = newStatus;
      detailAt = now;
      await refreshRun(name);
    }
  };
  every(1000, tick);
}

async function runAction(url, body, button) {
  button.disabled = true;
  try { await api("POST", url, body); } catch (e) { flash(e); } finally { button.disabled = false; }
  if (S.run) refreshRun(S.run);
}

// --- try ----------------------------------------------------------------------------------------

async function showChat() {
  let data;
  try { data = await api("GET", "/api/adapters"); } catch (e) { return flash(e); }
  const groups = new Map();
  for (const a of data.adapters) {
    const k = a.base_model_path || a.base_model;
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k).push(a);
  }
  const box = $("#chat-adapters");
  const previously = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  let n = 0;
  fill(box, ...(groups.size ? [...groups.entries()].map(([base, list]) => h("div", { class: "group" },
    h("p", { class: "base-name", text: "base: " + (list[0].base_model || base) }),
    list.map((a) => {
      const id = "ad-" + n++;
      return h("div", { class: "check" },
        h("input", { type: "checkbox", id, value: a.name, "data-base": base, checked: previously.has(a.name) }),
        h("label", { for: id, text: `${a.name}` + (a.recipe ? ` (${a.recipe}${a.eval_loss !== null && a.eval_loss !== undefined ? ", eval loss " + fmt.loss(a.eval_loss) : ""})` : "") }));
    }))) : [h("p", { class: "muted", text: "No finished runs yet: train one first." })]));
}

async function ask(e) {
  e.preventDefault();
  const box = $("#chat-error");
  box.hidden = true;
  const ticked = [...document.querySelectorAll("#chat-adapters input:checked")];
  const bases = new Set(ticked.map((i) => i.dataset.base));
  if (!ticked.length) return showError(box, new ApiError(400, { error: "tick at least one adapter" }));
  if (bases.size > 1) return showError(box, new ApiError(400, { error: "the ticked adapters were trained on different base models", hint: "tick adapters under one base" }));
  const question = $("#chat-question").value.trim();
  if (!question) return showError(box, new ApiError(400, { error: "type a question" }));
  const cols = new Map();
  const column = (model) => {
    if (!cols.has(model)) {
      const text = h("div", { class: "text" });
      const state = h("span", { class: "muted small", text: "waiting…" });
      const el = h("section", { class: "answer" + (model === "base" ? " base" : ""), "data-model": model },
        h("h3", {}, model === "base" ? "base model" : model, " ", state), text);
      $("#answers").append(el);
      cols.set(model, { text, state });
    }
    return cols.get(model);
  };
  fill($("#answers"), );
  column("base");
  ticked.forEach((i) => column(i.value));
  const btn = $("#btn-ask");
  btn.disabled = true;
  $("#chat-status").textContent = "asking…";
  try {
    const r = await fetch("/api/chat", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify({ runs: ticked.map((i) => i.value), question, max_tokens: Number($("#chat-max").value) || 128 }),
    });
    if (!r.ok) { let b = null; try { b = await r.json(); } catch (x) { b = null; } throw new ApiError(r.status, b); }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of chunk.split("\n")) if (line.startsWith("data: ")) onChatEvent(JSON.parse(line.slice(6)), column, box);
      }
    }
    $("#chat-status").textContent = "";
  } catch (err) {
    $("#chat-status").textContent = "";
    showError(box, err);
  } finally {
    btn.disabled = false;
  }
}

function onChatEvent(ev, column, box) {
  if (ev.type === "status") $("#chat-status").textContent = ev.text;
  else if (ev.type === "start") { $("#chat-status").textContent = "answering…"; column(ev.model).state.textContent = "answering…"; }
  else if (ev.type === "delta") column(ev.model).text.append(ev.text);
  else if (ev.type === "done") column(ev.model).state.textContent = ev.finish_reason === "length" ? "(max tokens reached)" : "";
  else if (ev.type === "error") {
    if (ev.model) { const c = column(ev.model); c.state.textContent = "error"; c.text.textContent = ev.error; }
    else showError(box, new ApiError(400, ev));
  }
}

// --- start --------------------------------------------------------------------------------------

async function boot() {
  try {
    const s = await api("GET", "/api/session");
    S.csrf = s.csrf;
    $("#logout").hidden = !s.auth;
  } catch (e) { return flash(e); }
  $("#logout").addEventListener("click", async () => { await api("POST", "/api/logout", {}); location.reload(); });
  $("#btn-stop").addEventListener("click", (e) => runAction("/api/run/stop", { name: S.run, now: e.target.dataset.now === "1" }, e.target));
  $("#btn-resume").addEventListener("click", (e) => runAction("/api/run/resume", { name: S.run }, e.target));
  $("#btn-merge").addEventListener("click", (e) => runAction("/api/run/job", { name: S.run, kind: "merge", dtype: $("#merge-dtype").value }, e.target));
  $("#btn-export").addEventListener("click", (e) => runAction("/api/run/job", { name: S.run, kind: "export", format: $("#export-format").value }, e.target));
  $("#btn-eval").addEventListener("click", (e) => runAction("/api/run/job", { name: S.run, kind: "eval" }, e.target));
  $("#chat-form").addEventListener("submit", ask);
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", boot);

// backshift's web UI: a small single-page app over the REST API and its
// event streams. No framework, no build step; everything it shows is put
// in the page as text (never as HTML), so nothing an agent writes can run
// here.
"use strict";

const main = () => document.getElementById("main");

// ---- DOM helpers -------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function show(...nodes) {
  fill(main(), ...nodes);
}

/// Replaces `parent`'s children with `nodes`, skipping empty ones.
function fill(parent, ...nodes) {
  parent.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

function stateBadge(state) {
  return el("span", { class: `state ${state}`, "data-state": state }, state.replace("_", " "));
}

function errorBox(err) {
  return el("div", { class: "error", role: "alert" },
    el("div", {}, err.message || String(err)),
    err.hint ? el("div", { class: "hint" }, err.hint) : null);
}

function ago(ts) {
  const s = Math.round((Date.now() - Date.parse(ts)) / 1000);
  if (!isFinite(s)) return ts;
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ts).toLocaleString();
}

/// How long until `ts`, in words.
function until(ts) {
  const s = Math.round((Date.parse(ts) - Date.now()) / 1000);
  if (!isFinite(s)) return ts;
  if (s <= 0) return "now";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

const short = (s, n) => (s && s.length > n ? s.slice(0, n - 1) + "…" : s || "");
const firstLine = (s) => (s || "").split("\n").find((l) => l.trim()) || "";

// ---- API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, hint) { super(message); this.status = status; this.hint = hint; }
}

async function api(method, path, body) {
  const opts = { method, headers: { "X-Backshift-UI": "1" }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(0, "the server cannot be reached", "is `backshift serve` running?");
  }
  if (resp.status === 401 && !path.startsWith("/ui/session")) {
    location.hash = "#/login";
    throw new ApiError(401, "signed out", "sign in again");
  }
  const text = await resp.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* plain text (a diff) */ }
  if (!resp.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(resp.status, e.message || `${resp.status} ${resp.statusText}`, e.hint);
  }
  return data;
}

// ---- routing -----------------------------------------------------------

let cleanup = [];
function onLeave(f) { cleanup.push(f); }

async function route() {
  for (const f of cleanup) { try { f(); } catch (_) { /* gone */ } }
  cleanup = [];
  const [, page, arg] = (location.hash || "#/").split("/");
  const nav = document.getElementById("nav");
  if (page !== "login") {
    try {
      await api("GET", "/ui/session");
    } catch (_) {
      location.hash = "#/login";
      return;
    }
    nav.hidden = false;
    refreshApprovalCount();
  } else {
    nav.hidden = true;
  }
  for (const a of nav.querySelectorAll("a")) {
    a.classList.toggle("current", a.dataset.nav === (page || "board"));
  }
  const views = { "": board, login, new: newTask, task, diff, approvals, sandboxes, settings };
  const view = views[page || ""] || notFound;
  try {
    await view(decodeURIComponent(arg || ""));
  } catch (e) {
    show(errorBox(e));
  }
  main().focus({ preventScroll: true });
}

function notFound() {
  show(el("h1", {}, "Not found"), el("p", {}, el("a", { href: "#/" }, "Back to the tasks")));
}

async function refreshApprovalCount() {
  try {
    const list = await api("GET", "/api/v1/approvals");
    const c = document.getElementById("approval-count");
    c.textContent = String(list.length);
    c.hidden = list.length === 0;
  } catch (_) { /* shown where it matters */ }
}

// ---- sign in -----------------------------------------------------------

function login() {
  const token = el("input", { id: "token", type: "password", autocomplete: "current-password", required: true });
  const out = el("div", { "aria-live": "polite" });
  const form = el("form", { class: "stack", onsubmit: async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    try {
      await api("POST", "/ui/session", { token: token.value });
      location.hash = "#/";
    } catch (e) {
      out.replaceChildren(errorBox(e));
    }
  } },
  el("label", { for: "token" }, "API token",
    el("span", { class: "muted" }, "The token `backshift serve` printed at its first start (also in ~/.config/backshift/credentials).")),
  token,
  el("div", {}, el("button", { class: "primary", type: "submit", id: "sign-in" }, "Sign in")),
  out);
  show(el("h1", {}, "Sign in"), form);
  token.focus();
}

async function signOut() {
  try { await api("DELETE", "/ui/session"); } catch (_) { /* gone anyway */ }
  location.hash = "#/login";
}

// ---- the task board ----------------------------------------------------

const ACTIVE = ["queued", "provisioning", "preparing", "running", "waiting_approval", "verifying", "publishing", "recovering", "paused"];

async function board() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const stateSel = el("select", { id: "filter-state" },
    ["all", "active", "succeeded", "failed", "cancelled", "timed_out"].map((s) =>
      el("option", { value: s, selected: (params.get("state") || "all") === s }, s.replace("_", " "))));
  const projectSel = el("select", { id: "filter-project" }, el("option", { value: "" }, "all projects"));
  const list = el("div", { id: "tasks", "aria-live": "polite" }, el("p", { class: "muted" }, "Loading tasks…"));
  const status = el("p", { class: "status-line" });
  show(el("h1", {}, "Tasks"),
    el("div", { class: "filters" },
      el("label", {}, "State", stateSel),
      el("label", {}, "Project", projectSel)),
    list, status);
  let tasks = [];
  const render = () => {
    const st = stateSel.value, pr = projectSel.value;
    const shown = tasks.filter((t) =>
      (st === "all" || (st === "active" ? ACTIVE.includes(t.state) : t.state === st)) &&
      (!pr || t.project_id === pr));
    if (tasks.length === 0) {
      list.replaceChildren(el("div", { class: "card" },
        el("p", {}, "No tasks yet."), el("a", { href: "#/new" }, "Hand one to backshift")));
      return;
    }
    if (shown.length === 0) {
      list.replaceChildren(el("p", { class: "muted" }, "No task matches these filters."));
      return;
    }
    list.replaceChildren(...shown.map((t) => el("div", { class: "card task", "data-task": t.id },
      el("div", { class: "row" },
        el("a", { class: "grow", href: `#/task/${t.id}` }, short(firstLine(t.prompt), 120)),
        stateBadge(t.state)),
      el("div", { class: "row muted" },
        el("span", {}, t.id),
        el("span", {}, t.agent),
        el("span", { class: "grow" }, short(t.repo, 60)),
        el("span", {}, ago(t.created_at)),
        t.attempts.length > 1 ? el("span", {}, `${t.attempts.length} attempts`) : null))));
  };
  const load = async () => {
    try {
      tasks = await api("GET", "/api/v1/tasks");
      const projects = [...new Set(tasks.map((t) => t.project_id))];
      const keep = projectSel.value;
      projectSel.replaceChildren(el("option", { value: "" }, "all projects"),
        ...projects.map((p) => el("option", { value: p, selected: p === keep },
          `${p} (${short(tasks.find((t) => t.project_id === p).repo, 40)})`)));
      render();
      status.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every 3 s.`;
    } catch (e) {
      list.replaceChildren(errorBox(e));
    }
  };
  stateSel.addEventListener("change", render);
  projectSel.addEventListener("change", render);
  await load();
  const timer = setInterval(load, 3000);
  onLeave(() => clearInterval(timer));
}

// ---- a new task --------------------------------------------------------

function newTask() {
  const f = (id, label, input, help) => el("label", { for: id }, label, help ? el("span", { class: "muted" }, help) : null, input);
  const repo = el("input", { id: "repo", required: true, placeholder: "/home/me/project or https://github.com/acme/app.git" });
  const prompt = el("textarea", { id: "prompt", required: true, placeholder: "What should the agent do?" });
  const agent = el("input", { id: "agent", list: "agents", placeholder: "builtin" });
  const agents = el("datalist", { id: "agents" }, ["builtin", "command", "opencode", "claude-code", "codex", "gemini"].map((a) => el("option", { value: a })));
  const command = el("input", { id: "command", placeholder: "only for the command agent" });
  const attempts = el("input", { id: "attempts", type: "number", min: 1, max: 10, value: 1 });
  const maxTurns = el("input", { id: "max-turns", type: "number", min: 1, placeholder: "server default" });
  const wall = el("input", { id: "wall-time", type: "number", min: 1, placeholder: "server default" });
  const verify = el("input", { id: "verify", placeholder: "e.g. pytest -q (else the repository's backshift.toml)" });
  const out = el("div", { "aria-live": "polite" });
  const submit = el("button", { class: "primary", type: "submit", id: "create" }, "Create task");
  const form = el("form", { class: "stack", onsubmit: async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    const body = { repo: repo.value.trim(), prompt: prompt.value };
    if (agent.value.trim()) body.agent = agent.value.trim();
    if (command.value.trim()) body.command = command.value.trim();
    if (verify.value.trim()) body.verify = verify.value.trim();
    const n = parseInt(attempts.value, 10);
    if (n > 1) body.attempts = n;
    const limits = {};
    if (maxTurns.value) limits.max_turns = parseInt(maxTurns.value, 10);
    if (wall.value) limits.wall_time_secs = parseInt(wall.value, 10);
    if (Object.keys(limits).length) body.limits = limits;
    submit.disabled = true;
    try {
      const created = await api("POST", "/api/v1/tasks", body);
      location.hash = `#/task/${created.id}`;
    } catch (e) {
      out.replaceChildren(errorBox(e));
      submit.disabled = false;
    }
  } },
  f("repo", "Repository", repo, "A path on the server's host, or a git URL."),
  f("prompt", "Task", prompt),
  el("div", { class: "pair" },
    f("agent", "Agent", agent), f("attempts", "Attempts", attempts, "side by side")),
  f("command", "Command", command),
  el("div", { class: "pair" },
    f("max-turns", "Max turns", maxTurns), f("wall-time", "Wall time (s)", wall)),
  f("verify", "Verify command", verify),
  agents,
  el("div", {}, submit),
  out);
  show(el("h1", {}, "New task"), form);
  repo.focus();
}

// ---- a task, live ------------------------------------------------------

const EVENT_TYPES = ["state_changed", "progress", "model_request", "model_response", "model_retry",
  "tool_call", "command_output", "tool_result", "agent_finished", "diff_stat", "checkpoint", "restored",
  "snapshot", "model_call", "agent_session", "agent_message", "agent_thought", "plan", "file_diff",
  "permission_decision", "egress", "warning", "verification_started", "verification", "winner",
  "delivered", "git_push", "approval_requested", "approval_answered"];

/// Renders events into a list, grouping each tool call with its output.
class EventView {
  constructor() {
    this.list = el("ol", { class: "events", id: "events" });
    this.calls = new Map();
    this.timeline = el("ol", { class: "timeline", id: "timeline" });
    this.last = 0;
  }

  add(e) {
    if (e.seq <= this.last) return; // a reconnect's replay
    this.last = e.seq;
    const li = (kind, ...body) => {
      const item = el("li", { "data-type": kind, "data-seq": e.seq }, el("span", { class: "kind" }, kind.replace(/_/g, " ")), ...body);
      this.list.append(item);
      return item;
    };
    switch (e.type) {
      case "state_changed": {
        this.timeline.append(el("li", {}, stateBadge(e.to), e.reason ? ` (${e.reason})` : ""));
        li("state", "→ ", stateBadge(e.to), e.detail ? ` ${e.detail}` : "");
        break;
      }
      case "progress": li("progress", e.message); break;
      case "warning": li("warning", "⚠ ", e.message); break;
      case "model_response": if (e.text) li("model", e.text); break;
      case "agent_message": li("agent", e.text); break;
      case "agent_thought": li("thought", el("span", { class: "muted" }, e.text)); break;
      case "model_retry": li("retry", `model request failed (retry ${e.retry}): ${e.error}`); break;
      case "tool_call": {
        const out = el("pre", { class: "output" });
        const mark = el("span", { class: "mark" }, "…");
        const args = e.arguments || {};
        const what = e.title || args.command || args.path || JSON.stringify(args);
        // Open while it runs, folded once it ended.
        const details = el("details", { "data-call": e.call_id, open: true },
          el("summary", {}, mark, " ", e.name, " ", el("code", {}, short(what, 160))), out);
        this.calls.set(e.call_id, { out, mark });
        li("tool", details);
        break;
      }
      case "command_output": {
        const c = this.calls.get(e.call_id);
        if (c) c.out.append(e.text);
        else li("output", el("pre", {}, e.text));
        break;
      }
      case "tool_result": {
        const c = this.calls.get(e.call_id);
        const text = `${e.ok ? "✔" : "✗"}${e.exit_code !== null && e.exit_code !== undefined ? ` exit ${e.exit_code}` : ""} (${e.duration_ms} ms)`;
        if (c) {
          c.mark.textContent = e.ok ? "✔" : "✗";
          c.out.closest("details").open = false;
          if (!c.out.textContent) c.out.append(e.output || "");
          c.out.append(`\n${text}`);
        } else li("result", `${e.name} ${text}`);
        break;
      }
      case "file_diff":
        li("diff", el("details", {}, el("summary", {}, `± ${e.path}`), diffBlock(e.diff || "")));
        break;
      case "agent_finished": li("finished", "✔ agent finished: ", firstLine(e.summary)); break;
      case "diff_stat": li("diff", `± ${e.branch}: ${e.files_changed} file(s), +${e.insertions} -${e.deletions}`); break;
      case "egress": li("egress", `⇄ ${e.method || "CONNECT"} ${e.host}:${e.port}${e.path || ""}: ${e.decision} (${e.reason})`); break;
      case "approval_requested": li("approval", `? waiting for a person: ${e.summary}`); break;
      case "approval_answered": li("approval", `? ${e.decision}${e.scope ? ` (${e.scope})` : ""} by ${e.by}${e.reason ? `: ${e.reason}` : ""}`); break;
      case "permission_decision": li("permission", `${e.title}: ${e.decision} by ${e.by}`); break;
      case "verification_started": li("verify", `▶ verification ${e.iteration}: ${firstLine(e.command)}`); break;
      case "verification": {
        const r = e.report || {};
        const counts = r.format === "exit_code" ? "" : `, ${r.passed} passed, ${r.failed} failed, ${r.skipped} skipped`;
        li("verify", `${e.passed ? "✔ tests passed" : "✗ tests failed"} (iteration ${e.iteration}${counts})`,
          ...(r.failures || []).slice(0, 10).map((f) => el("div", {}, `✗ ${f.name}: ${firstLine(f.message)}`)));
        break;
      }
      case "checkpoint": li("checkpoint", `⚑ checkpoint ${e.n} after turn ${e.turn}`); break;
      case "restored": li("restored", e.adopted ? "↺ re-attached to the surviving sandbox" : `↺ rebuilt from checkpoint ${e.checkpoint}`); break;
      case "winner": li("winner", `★ chosen as the result (rank ${e.rank} of ${e.of}, by ${e.by}): ${e.why}`); break;
      case "delivered": li("delivered", e.pull_request_url ? `⇪ pull request ${e.pull_request_url}` : `⇪ delivery ${e.state}${e.error ? `: ${e.error}` : ""}`); break;
      case "git_push": li("git", `⇡ push ${(e.refs || []).join(", ")}: ${e.decision}`); break;
      default: break; // model_request, model_call, snapshot, agent_session, plan: in the API
    }
  }
}

/// What is known of attempt `a`: its state, branch, end, tests, diff.
function renderFacts(facts, a) {
  const u = a.usage;
  fill(facts,
    el("div", { class: "row" }, el("strong", {}, a.id), stateBadge(a.state), el("span", { class: "grow muted" }, a.branch)),
    a.detail ? el("p", {}, a.reason ? `${a.reason}: ` : "", a.detail) : null,
    a.verification ? el("p", { id: "tests" }, a.verification.passed ? "✔ tests passed" : "✗ tests failed",
      ` (${a.verification.report.passed} passed, ${a.verification.report.failed} failed; ${a.verifications} run(s))`) : null,
    u ? el("p", { class: "muted" }, `${u.calls} model call(s), ${u.input_tokens + u.output_tokens} tokens${u.cost_usd ? `, $${u.cost_usd.toFixed(4)}` : ""}`) : null,
    a.head_commit ? el("p", {}, el("a", { href: `#/diff/${a.id}`, id: "diff-link" }, "View the diff")) : null);
}

function diffBlock(text) {
  const pre = el("pre", { class: "diff" });
  for (const line of text.split("\n")) {
    const cls = line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") ? "file"
      : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : "";
    pre.append(el("span", { class: cls }, line), "\n");
  }
  return pre;
}

const PAUSABLE = ["running", "waiting_approval"];

// Pause (stop the sandbox, files kept) or resume an attempt; nothing for
// an attempt in another state. The request answers once it is done.
function pauseButton(a, done, failed) {
  if (!a || !(PAUSABLE.includes(a.state) || a.state === "paused")) return null;
  const verb = a.state === "paused" ? "resume" : "pause";
  const label = verb === "pause" ? "Pause (stop its sandbox, keep its files)" : "Resume";
  return el("button", { [`data-${verb}`]: a.id, onclick: async (ev) => {
    ev.target.disabled = true;
    ev.target.textContent = verb === "pause" ? "Pausing…" : "Resuming…";
    try { await api("POST", `/api/v1/attempts/${a.id}/${verb}`); await done(); } catch (e) { failed(e); ev.target.disabled = false; ev.target.textContent = label; }
  } }, label);
}

async function task(id) {
  let t = await api("GET", `/api/v1/tasks/${encodeURIComponent(id)}`);
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  let current = params.get("attempt") || t.winner || t.attempts[t.attempts.length - 1].id;
  const head = el("div", { id: "task-head" });
  const compare = el("div", { id: "compare" });
  const tabs = el("div", { class: "tabs", role: "tablist" });
  const body = el("div", { id: "attempt" });
  show(head, compare, tabs, body);

  const renderHead = () => {
    fill(head,
      el("h1", {}, firstLine(t.prompt)),
      el("div", { class: "row" }, stateBadge(t.state),
        el("span", { class: "muted" }, `${t.id} · ${t.agent} · ${short(t.repo, 60)} · ${ago(t.created_at)}`)),
      t.prompt.includes("\n") ? el("details", {}, el("summary", {}, "Full task"), el("pre", {}, t.prompt)) : null,
      t.delivery && t.delivery.pull_request_url ? el("p", {}, "Pull request: ", el("a", { href: t.delivery.pull_request_url }, t.delivery.pull_request_url)) : null,
      t.handoff ? el("details", { open: true }, el("summary", {}, "Handoff"), el("pre", {}, t.handoff)) : null,
      ACTIVE.includes(t.state) ? el("div", { class: "actions" },
        pauseButton(t.attempts.find((x) => x.id === current), async () => {
          t = await api("GET", `/api/v1/tasks/${t.id}`); renderHead();
        }, (e) => head.append(errorBox(e))),
        el("button", { class: "danger", id: "cancel", onclick: async (ev) => {
          ev.target.disabled = true;
          try { t = await api("POST", `/api/v1/tasks/${t.id}/cancel`); renderHead(); } catch (e) { head.append(errorBox(e)); }
        } }, "Cancel task")) : null);
    fill(compare, t.attempts.length > 1 ? comparison(t, async (attempt) => {
      try { t = await api("POST", `/api/v1/tasks/${t.id}/pick`, { attempt }); renderHead(); } catch (e) { compare.append(errorBox(e)); }
    }) : null);
    fill(tabs, ...(t.attempts.length > 1 ? t.attempts.map((a) => el("button", {
      role: "tab", "aria-selected": String(a.id === current), onclick: () => { current = a.id; renderHead(); openAttempt(); },
    }, `#${a.n} ${a.agent} `, stateBadge(a.state), t.winner === a.id ? " ★" : "")) : []));
  };

  let source = null;
  const openAttempt = async () => {
    if (source) source.close();
    const a = t.attempts.find((x) => x.id === current);
    const view = new EventView();
    const status = el("p", { class: "status-line", id: "stream-status" }, "Connecting…");
    const pending = el("div", { id: "pending" });
    const facts = el("div", { class: "card", id: "attempt-facts" });
    renderFacts(facts, a);
    body.replaceChildren(facts, pending, el("h2", {}, "Timeline"), view.timeline, el("h2", {}, "What happened"), view.list, status);
    const refreshPending = async () => {
      try {
        const list = (await api("GET", "/api/v1/approvals")).filter((p) => p.attempt_id === a.id);
        pending.replaceChildren(...list.map(approvalCard));
      } catch (_) { /* the stream goes on */ }
    };
    refreshPending();
    source = new EventSource(`/api/v1/attempts/${encodeURIComponent(a.id)}/events/stream`);
    source.onopen = () => { status.textContent = "Live: new events appear as they happen."; };
    source.onerror = () => { status.textContent = "Connection lost; reconnecting and resuming after the last event…"; };
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, (m) => {
        const e = JSON.parse(m.data);
        view.add(e);
        if (type === "approval_requested" || type === "approval_answered") { refreshPending(); refreshApprovalCount(); }
        if (type === "state_changed") refreshTask();
      });
    }
    source.addEventListener("end", () => {
      source.close();
      status.textContent = "The attempt has ended.";
      refreshTask();
    });
  };
  let refreshing = false;
  const refreshTask = async () => {
    if (refreshing) return;
    refreshing = true;
    try {
      t = await api("GET", `/api/v1/tasks/${t.id}`);
      renderHead();
      const a = t.attempts.find((x) => x.id === current);
      const facts = body.querySelector("#attempt-facts");
      if (a && facts) renderFacts(facts, a);
    } catch (_) { /* next time */ } finally { refreshing = false; }
  };
  renderHead();
  await openAttempt();
  onLeave(() => source && source.close());
}

/// A task's attempts side by side, best first, with a pick button for
/// those that succeeded.
function comparison(t, pick) {
  const rows = t.ranking.map((id) => t.attempts.find((a) => a.id === id)).filter(Boolean);
  const cell = (v) => el("td", {}, v);
  return el("div", { class: "card" },
    el("h2", {}, "Attempts, best first"),
    el("div", { class: "scroll" }, el("table", { class: "compare" },
      el("thead", {}, el("tr", {}, ["Rank", "Attempt", "Agent", "State", "Tests", "Change", "Tokens", "Time", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((a) => {
        const v = a.verification;
        const tests = !v ? "–" : v.report.format === "exit_code" ? (v.passed ? "passed" : "failed")
          : `${v.passed ? "passed" : "failed"} ${v.report.passed}/${v.report.passed + v.report.failed}`;
        const u = a.usage;
        return el("tr", { "data-attempt": a.id, class: t.winner === a.id ? "winner" : null },
          cell(`${t.winner === a.id ? "★ " : ""}${a.rank}`),
          cell(el("a", { href: `#/task/${t.id}?attempt=${a.id}` }, a.id)),
          cell(a.agent), cell(stateBadge(a.state)), cell(tests),
          cell(a.diff ? `+${a.diff.insertions} −${a.diff.deletions}` : "–"),
          cell(u ? String(u.input_tokens + u.output_tokens) : "–"),
          cell(a.duration_ms !== undefined ? `${(a.duration_ms / 1000).toFixed(1)} s` : "–"),
          cell(a.state === "succeeded" && t.winner !== a.id
            ? el("button", { "data-pick": a.id, onclick: () => pick(a.id) }, "Deliver this one") : ""));
      })))),
    t.winner ? el("p", { class: "muted" }, `The result: ${t.winner} (chosen by ${t.winner_by}).`)
      : el("p", { class: "muted" }, "The result is chosen when every attempt has ended."));
}

// ---- sandboxes ---------------------------------------------------------

const mib = (b) => `${Math.round(b / 1048576)} MiB`;

async function sandboxes() {
  const list = el("div", { id: "sandboxes", "aria-live": "polite" }, el("p", { class: "muted" }, "Measuring…"));
  const status = el("p", { class: "status-line" });
  const pool = el("p", { id: "pool", class: "muted" });
  show(el("h1", {}, "Sandboxes"), pool, list, status);
  const load = async () => {
    try {
      const [boxes, p] = await Promise.all([api("GET", "/api/v1/sandboxes"), api("GET", "/api/v1/pool")]);
      pool.textContent = poolText(p);
      if (boxes.length === 0) {
        list.replaceChildren(el("p", { class: "muted" }, "No sandbox is running: none of the tasks is at work."));
      } else {
        list.replaceChildren(...boxes.map((b) => el("div", { class: "card sandbox", "data-sandbox": b.id },
          el("div", { class: "row" },
            el("strong", { class: "grow" }, b.attempt_id ? el("a", { href: `#/task/${b.task_id}?attempt=${b.attempt_id}` }, b.attempt_id) : b.id.slice(0, 12)),
            el("span", { class: `state ${b.running ? "running" : b.attempt_state === "paused" ? "paused" : "cancelled"}` },
              b.running ? (b.role === "warm" ? "ready (warm pool)" : b.role && b.role !== "agent" ? `running (${b.role})` : b.from_pool ? "running (from the warm pool)" : "running") : b.attempt_state === "paused" ? "stopped (paused)" : "stopped")),
          el("div", { class: "row muted" },
            el("span", {}, `CPU ${b.cpu_percent === null || b.cpu_percent === undefined ? "–" : b.cpu_percent.toFixed(1) + " %"}`),
            el("span", { class: "memory" }, `memory ${mib(b.memory_bytes)} of ${mib(b.memory_limit_bytes)}`),
            el("span", {}, `${b.pids} processes`),
            el("span", {}, b.disk_bytes === null || b.disk_bytes === undefined ? "disk –" : `disk ${mib(b.disk_bytes)}${b.disk_limit_bytes ? ` of ${mib(b.disk_limit_bytes)}` : ""}`)),
          b.disk_limit_note ? el("p", { class: "muted" }, b.disk_limit_note) : null,
          b.task_id ? el("div", { class: "actions" },
            b.role === "agent" && b.attempt_state ? pauseButton({ id: b.attempt_id, state: b.attempt_state }, load, (e) => list.append(errorBox(e))) : null,
            el("button", { class: "danger", "data-cancel": b.task_id, onclick: async (ev) => {
            ev.target.disabled = true;
            try { await api("POST", `/api/v1/tasks/${b.task_id}/cancel`); load(); } catch (e) { list.append(errorBox(e)); }
          } }, "Cancel its task (the sandbox goes)")) : null)));
      }
      status.textContent = `Measured ${new Date().toLocaleTimeString()}; every 5 s.`;
    } catch (e) {
      list.replaceChildren(errorBox(e));
    }
  };
  await load();
  const timer = setInterval(load, 5000);
  onLeave(() => clearInterval(timer));
}

function poolText(p) {
  if (p.size === 0) return "Warm pool: off. Every task's sandbox is made when it starts ([sandbox] warm = N keeps N ready).";
  const ready = p.environments.reduce((n, e) => n + e.ready, 0);
  const rate = p.hit_rate === null || p.hit_rate === undefined ? "no task yet" : `${Math.round(p.hit_rate * 100)} % of tasks started on one`;
  const trouble = p.environments.find((e) => e.last_error);
  return `Warm pool: ${ready} ready across ${p.environments.length} environment${p.environments.length === 1 ? "" : "s"} (${p.size} each); ${rate} (${p.hits} of ${p.hits + p.misses}).`
    + (trouble ? ` Cannot make sandboxes for ${trouble.image}: ${trouble.last_error}` : "");
}

// ---- settings ----------------------------------------------------------

function ruleText(r) {
  let s = `${r.action} ${r.host}`;
  if (r.ports && r.ports.length) s += `:${r.ports.join(",")}`;
  if (r.methods && r.methods.length) s += ` ${r.methods.join(",")}`;
  if (r.path_prefix) s += ` ${r.path_prefix}*`;
  return s;
}

async function settings() {
  const [projects, secrets, me, tokens] = await Promise.all([
    api("GET", "/api/v1/projects"), api("GET", "/api/v1/secrets"), api("GET", "/ui/session"),
    api("GET", "/api/v1/tokens")]);
  const tokenList = el("ul", { id: "tokens" });
  const tokenOut = el("div", { "aria-live": "polite" });
  const drawTokens = (list) => fill(tokenList, list.map((t) => el("li", { "data-token": t.name },
    el("code", {}, t.name), ` made ${ago(t.created_at)}`, t.name === me.token ? " (this session)" : "", " ",
    el("button", { class: "link", "data-revoke": t.name, onclick: async () => {
      if (t.name === me.token && !confirm("Revoke the token this session uses? You will be signed out.")) return;
      try {
        await api("DELETE", `/api/v1/tokens/${encodeURIComponent(t.name)}`);
        drawTokens(await api("GET", "/api/v1/tokens"));
        tokenOut.replaceChildren(el("p", { class: "muted" }, `Revoked ${t.name}.`));
      } catch (e) { tokenOut.replaceChildren(errorBox(e)); }
    } }, "revoke"))));
  drawTokens(tokens);
  const tokenName = el("input", { id: "token-name", placeholder: "name, e.g. ci", "aria-label": "New token's name" });
  const tokenForm = el("form", { class: "row", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const made = await api("POST", "/api/v1/tokens", { name: tokenName.value.trim() });
      tokenName.value = "";
      drawTokens(await api("GET", "/api/v1/tokens"));
      tokenOut.replaceChildren(el("div", { class: "card" },
        el("p", {}, `Token ${made.name}: copy it now, it is not shown again.`),
        el("pre", { id: "new-token" }, made.token)));
    } catch (e) { tokenOut.replaceChildren(errorBox(e)); }
  } }, tokenName, el("button", { type: "submit", id: "make-token" }, "Make a token"));
  const projectCards = projects.map((p) => {
    const rules = el("ul", { class: "rules" });
    const out = el("div", { "aria-live": "polite" });
    const save = async (next) => {
      try {
        const saved = await api("PUT", `/api/v1/projects/${p.id}/egress`, { rules: next });
        p.egress_rules = saved.egress_rules;
        draw();
        out.replaceChildren(el("p", { class: "muted" }, "Saved: the next request of its sandboxes follows it."));
      } catch (e) {
        out.replaceChildren(errorBox(e));
      }
    };
    const draw = () => fill(rules, p.egress_rules.length === 0 ? el("li", { class: "muted" }, "No rules of its own: the server's apply.")
      : p.egress_rules.map((r, i) => el("li", {}, el("code", {}, ruleText(r)), " ",
        el("button", { class: "link", "data-remove": i, onclick: () => save(p.egress_rules.filter((_, j) => j !== i)) }, "remove"))));
    draw();
    const host = el("input", { placeholder: "host, e.g. *.pythonhosted.org", "aria-label": "Host", class: "rule-host" });
    const port = el("input", { placeholder: "port (any)", type: "number", min: 1, max: 65535, "aria-label": "Port", class: "rule-port" });
    const action = el("select", { "aria-label": "Action", class: "rule-action" }, ["allow", "ask", "deny"].map((a) => el("option", { value: a }, a)));
    const add = el("form", { class: "row", onsubmit: (ev) => {
      ev.preventDefault();
      const r = { host: host.value.trim(), action: action.value };
      if (port.value) r.ports = [parseInt(port.value, 10)];
      save([...p.egress_rules, r]);
    } }, host, port, action, el("button", { type: "submit" }, "Add rule"));
    const dockerOut = el("div", { "aria-live": "polite" });
    const dockerBox = el("input", { type: "checkbox", class: "docker-engine", checked: p.docker_engine, onchange: async (ev) => {
      try {
        const saved = await api("PUT", `/api/v1/projects/${p.id}/docker`, { enabled: ev.target.checked });
        ev.target.checked = saved.docker_engine;
        dockerOut.replaceChildren(el("p", { class: "muted" }, saved.docker_engine
          ? "Saved: its next sandboxes get a Docker engine of their own."
          : "Saved: its next sandboxes have no Docker engine."));
      } catch (e) {
        ev.target.checked = !ev.target.checked;
        dockerOut.replaceChildren(errorBox(e));
      }
    } });
    return el("div", { class: "card project", "data-project": p.id },
      el("div", { class: "row" }, el("strong", {}, p.id), el("span", { class: "grow muted" }, p.source)),
      el("h3", {}, "Network rules"), rules, add, out,
      el("h3", {}, "Docker"),
      el("label", {}, dockerBox, " A Docker engine of its own in each sandbox (DOCKER_HOST). It runs with broad privileges on this host: enable it only for repositories you trust."),
      dockerOut);
  });
  show(el("h1", {}, "Settings"),
    el("p", { class: "muted" }, `Signed in with the token "${me.token}". Server-wide policy and limits are in the server's configuration file.`),
    el("h2", {}, "Projects"),
    projects.length ? projectCards : el("p", { class: "muted" }, "No project yet: one is made with its first task."),
    el("h2", {}, "API tokens"),
    el("p", { class: "muted" }, "Each can do everything the API does. Only their hashes are kept."),
    tokenList, tokenForm, tokenOut,
    el("h2", {}, "Secrets"),
    el("p", { class: "muted" }, "Names only: values never leave the server (`backshift secrets set NAME` to add one)."),
    secrets.length === 0 ? el("p", { class: "muted" }, "No secrets.")
      : el("ul", { id: "secrets" }, secrets.map((x) => el("li", { "data-secret": x.name }, el("code", {}, x.name),
        x.grants.length ? ` → ${x.grants.map((g) => `${g.project_id} as ${g.as}${g.setup_only ? " (setup only)" : ""}`).join(", ")}` : " (granted to no project)"))));
}

// ---- approvals ---------------------------------------------------------

function approvalCard(p) {
  const reason = el("input", { placeholder: "reason (for a denial)", "aria-label": "Reason for denying" });
  const out = el("div", { "aria-live": "polite" });
  const answer = async (decision, scope) => {
    const body = { decision };
    if (scope) body.scope = scope;
    if (decision === "deny" && reason.value.trim()) body.reason = reason.value.trim();
    for (const b of card.querySelectorAll("button")) b.disabled = true;
    try {
      await api("POST", `/api/v1/approvals/${p.id}`, body);
      card.replaceChildren(el("p", {}, `${decision === "approve" ? "Approved" : "Denied"}: ${p.summary}`));
      refreshApprovalCount();
    } catch (e) {
      out.replaceChildren(errorBox(e));
      for (const b of card.querySelectorAll("button")) b.disabled = false;
    }
  };
  const card = el("div", { class: "card approval", "data-approval": p.id },
    el("div", { class: "row" }, el("strong", { class: "grow" }, p.summary), el("span", { class: "muted" }, p.kind)),
    el("div", { class: "muted" }, el("a", { href: `#/task/${p.task_id}` }, p.attempt_id), ` · denied in ${until(p.expires_at)} unless answered (at ${new Date(p.expires_at).toLocaleTimeString()})`),
    el("div", { class: "actions" },
      el("button", { class: "primary", "data-answer": "once", onclick: () => answer("approve", "once") }, "Approve once"),
      el("button", { "data-answer": "task", onclick: () => answer("approve", "task") }, "For this task"),
      el("button", { "data-answer": "project", onclick: () => answer("approve", "project") }, "Always for the project"),
      el("button", { class: "danger", "data-answer": "deny", onclick: () => answer("deny") }, "Deny")),
    reason, out);
  return card;
}

async function approvals() {
  const list = el("div", { id: "approvals", "aria-live": "polite" });
  show(el("h1", {}, "Approvals"), list);
  const load = async () => {
    try {
      const pending = await api("GET", "/api/v1/approvals");
      const open = new Set([...list.querySelectorAll("[data-approval]")].map((c) => c.dataset.approval));
      if (pending.length === 0 && open.size === 0) {
        list.replaceChildren(el("p", { class: "muted" }, "Nothing is waiting for a decision."));
        return;
      }
      for (const p of pending) if (!open.has(p.id)) list.append(approvalCard(p));
      const empty = list.querySelector("p.muted");
      if (empty && pending.length) empty.remove();
    } catch (e) {
      list.replaceChildren(errorBox(e));
    }
  };
  await load();
  const timer = setInterval(load, 2000);
  onLeave(() => clearInterval(timer));
}

// ---- a diff ------------------------------------------------------------

async function diff(attempt) {
  show(el("p", { class: "muted" }, "Loading the diff…"));
  const text = await api("GET", `/api/v1/attempts/${encodeURIComponent(attempt)}/diff`);
  const task = attempt.replace(/-\d+$/, "");
  show(el("h1", {}, `Diff of ${attempt}`),
    el("p", {}, el("a", { href: `#/task/${task}?attempt=${attempt}` }, "Back to the task")),
    text && text.trim() ? diffBlock(text) : el("p", { class: "muted" }, "No changes."));
}

// ---- start -------------------------------------------------------------

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", signOut);
  route();
});

// lb's live dashboard: polls /api/v1/state every second and renders pools and backends.
//
// Read-only: it never calls the drain/undrain endpoints. Every string from the API reaches the
// page through textContent or setAttribute, never as HTML. Memory stays bounded: one previous
// sample per pool and backend (dropped when they leave the config) and at most
// MAX_ERRORS_SHOWN recent errors per pool.
"use strict";

(function () {
  const POLL_INTERVAL_MS = 1000;
  const POLL_TIMEOUT_MS = 3000; // a poll that hangs is abandoned and counts as failed
  const MAX_ERRORS_SHOWN = 20;
  const MAX_MESSAGE_CHARS = 500;
  const CLASS_KEYS = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];
  const DASH = "–";

  // ---- Pure computations (exported on window.lbDashboard for the tests) -------------------

  /**
   * The q-quantile of observations given as NON-cumulative bucket counts, the last slot being
   * +Inf (counts.length === bounds.length + 1), by Prometheus' histogram_quantile: find the
   * bucket holding rank q * total and interpolate linearly inside it, the first bucket
   * starting at 0. Returns null when there is no observation; when the rank falls in the +Inf
   * bucket, returns the highest finite bound with overflow = true (the true value is above).
   */
  function histogramQuantile(q, bounds, counts) {
    let total = 0;
    for (const c of counts) total += c;
    if (!(total > 0) || counts.length !== bounds.length + 1) return null;
    const rank = q * total;
    let below = 0; // observations in the buckets before the current one
    for (let i = 0; i < counts.length; i++) {
      const c = counts[i];
      if (c > 0 && below + c >= rank) {
        if (i === bounds.length) return { s: bounds[bounds.length - 1], overflow: true };
        const lower = i === 0 ? 0 : bounds[i - 1];
        const upper = bounds[i];
        if (i === 0 && upper <= 0) return { s: upper, overflow: false };
        return { s: lower + (upper - lower) * ((rank - below) / c), overflow: false };
      }
      below += c;
    }
    return { s: bounds[bounds.length - 1], overflow: true }; // unreachable for 0 <= q <= 1
  }

  /** Element-wise cur - prev, or null if the shapes differ or a counter went down (reset). */
  function deltas(prev, cur) {
    if (!prev || !cur || prev.length !== cur.length) return null;
    const out = new Array(cur.length);
    for (let i = 0; i < cur.length; i++) {
      const d = cur[i] - prev[i];
      if (!(d >= 0)) return null;
      out[i] = d;
    }
    return out;
  }

  function num(x) {
    const n = Number(x);
    return Number.isFinite(n) ? n : 0;
  }

  function classCounts(byClass) {
    const obj = byClass || {};
    return CLASS_KEYS.map((k) => num(obj[k]));
  }

  /** What one poll says about a backend (or a pool), kept until the next poll. */
  function sampleOf(entity, time) {
    const latency = entity.latency || {};
    return {
      time: num(time),
      requests: num(entity.requests_total),
      retries: num(entity.retries_total),
      classes: classCounts(entity.responses_by_class),
      bounds: Array.isArray(latency.buckets) ? latency.buckets.map(num) : [],
      counts: Array.isArray(latency.counts) ? latency.counts.map(num) : [],
    };
  }

  /**
   * Figures over the window between two samples of the same backend or pool:
   * rps = Δrequests_total / Δt; errorRate = (Δ5xx + Δnone) / Δ(all classes);
   * retriesPerS = Δretries_total / Δt; p50/p99 from the histogram bucket deltas.
   * A figure is null when it cannot be known (first poll, no traffic, a counter reset).
   */
  function windowFigures(prev, cur) {
    const out = { rps: null, errorRate: null, retriesPerS: null, p50: null, p99: null };
    if (!prev) return out;
    const dt = cur.time - prev.time;
    if (!(dt > 0)) return out;
    const dReq = cur.requests - prev.requests;
    if (dReq >= 0) out.rps = dReq / dt;
    const dRetries = cur.retries - prev.retries;
    if (dRetries >= 0) out.retriesPerS = dRetries / dt;
    const dClasses = deltas(prev.classes, cur.classes);
    if (dClasses) {
      let answered = 0;
      for (const d of dClasses) answered += d;
      if (answered > 0) out.errorRate = (dClasses[0] + dClasses[5]) / answered;
    }
    const sameBounds =
      prev.bounds.length === cur.bounds.length && prev.bounds.every((b, i) => b === cur.bounds[i]);
    const dCounts = sameBounds ? deltas(prev.counts, cur.counts) : null;
    if (dCounts) {
      out.p50 = histogramQuantile(0.5, cur.bounds, dCounts);
      out.p99 = histogramQuantile(0.99, cur.bounds, dCounts);
    }
    return out;
  }

  /** The one word the state badge shows; an operator's drain outranks the rest. */
  function backendState(b) {
    if (b.drained) return "drained";
    if (!b.healthy) return "unhealthy";
    if (b.ejected) return "ejected";
    if (b.available === false) return "held";  // by a Retry-After
    return "available";
  }

  // ---- Formatting ---------------------------------------------------------------------------

  function fmtRate(x) {
    if (x === null) return DASH;
    return x >= 100 ? x.toFixed(0) : x.toFixed(1);
  }

  function fmtPercent(r) {
    if (r === null) return DASH;
    if (r === 0) return "0%";
    const p = r * 100;
    return (p < 1 ? p.toFixed(2) : p < 10 ? p.toFixed(1) : p.toFixed(0)) + "%";
  }

  function fmtSeconds(s) {
    if (s === null || !Number.isFinite(s)) return DASH;
    if (s < 0.001) return (s * 1000).toFixed(2) + " ms";
    if (s < 0.01) return (s * 1000).toFixed(1) + " ms";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 100) return s.toFixed(2) + " s";
    return s.toFixed(0) + " s";
  }

  function fmtQuantile(qv) {
    if (qv === null) return DASH;
    return (qv.overflow ? "> " : "") + fmtSeconds(qv.s);
  }

  function fmtUptime(s) {
    s = Math.max(0, Math.floor(num(s)));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const parts = d ? [d + "d", h + "h"] : h ? [h + "h", m + "m"] : m ? [m + "m"] : [];
    parts.push((s % 60) + "s");
    return parts.slice(0, d || h ? 2 : 3).join(" ");
  }

  function fmtClock(epochS) {
    const t = new Date(num(epochS) * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return pad(t.getHours()) + ":" + pad(t.getMinutes()) + ":" + pad(t.getSeconds());
  }

  function fmtWeight(w) {
    w = num(w);
    return Number.isInteger(w) ? String(w) : w.toFixed(2);
  }

  // ---- DOM helpers: text only, never HTML ----------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  /** An API value as display text: null and undefined become ``fallback``. */
  function str(value, fallback) {
    return value === undefined || value === null ? fallback : String(value);
  }

  /** Put ``node`` at index ``i`` of ``parent`` unless it is there already (no DOM churn). */
  function placeAt(parent, node, i) {
    if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
  }

  function setText(node, text) {
    text = String(text);
    if (node.textContent !== text) node.textContent = text;
  }

  function setBadge(node, text, tone) {
    setText(node, text);
    const cls = "badge badge-" + tone;
    if (node.className !== cls) node.className = cls;
  }

  function setTone(node, tone) {
    // tone: "" | "warn" | "bad"
    node.classList.toggle("tone-warn", tone === "warn");
    node.classList.toggle("tone-bad", tone === "bad");
  }

  function errorTone(rate) {
    if (rate === null || rate === 0) return "";
    return rate >= 0.05 ? "bad" : "warn";
  }

  // ---- Views --------------------------------------------------------------------------------

  const BACKEND_COLUMNS = [
    ["name", "Backend"],
    ["health", "Health"],
    ["state", "State"],
    ["in_flight", "In flight"],
    ["rps", "Req/s"],
    ["error_rate", "Errors"],
    ["p50", "p50"],
    ["p99", "p99"],
    ["latency_estimate", "Latency est."],
    ["weight", "Weight"],
    ["requests_total", "Requests"],
  ];
  const NUMERIC = new Set([
    "in_flight", "rps", "error_rate", "p50", "p99", "latency_estimate", "weight", "requests_total",
  ]);

  /** One backend's row; keeps the previous sample for the window figures. */
  class BackendRow {
    constructor(poolName, backendName) {
      this.prev = null;
      this.row = el("tr", { "data-pool": poolName, "data-backend": backendName });
      this.cells = {};
      for (const [field] of BACKEND_COLUMNS) {
        const td = el("td", NUMERIC.has(field) ? { class: "num" } : null);
        this.row.appendChild(td);
        this.cells[field] = td;
      }
      this.nameText = el("div", { class: "backend-name", "data-field": "name" }, backendName);
      this.urlText = el("div", { class: "muted small", "data-field": "url" });
      this.cells.name.append(this.nameText, this.urlText);
      this.health = el("span", { "data-field": "health" });
      this.cells.health.appendChild(this.health);
      this.state = el("span", { "data-field": "state" });
      this.stateNote = el("span", { class: "muted small state-note", "data-field": "state_note" });
      this.cells.state.append(this.state, this.stateNote);
      for (const [field] of BACKEND_COLUMNS) {
        if (NUMERIC.has(field)) this.cells[field].setAttribute("data-field", field);
      }
      this.cells.weight.title = "effective weight (slow start) / configured weight";
    }

    update(b, time) {
      const cur = sampleOf(b, time);
      const f = windowFigures(this.prev, cur);
      this.prev = cur;

      setText(this.urlText, b.url || "");
      setBadge(this.health, b.healthy ? "healthy" : "unhealthy", b.healthy ? "green" : "red");
      const state = backendState(b);
      const tone = {
        available: "green", drained: "grey", ejected: "amber", held: "amber", unhealthy: "red",
      };
      setBadge(this.state, state, tone[state]);
      let note = "";
      if (b.ejected) note = Math.ceil(num(b.ejected_for_s)) + " s left";
      if (b.ejected && state !== "ejected") note = "ejected, " + note;
      if (state === "held") note = "Retry-After, " + Math.ceil(num(b.held_for_s)) + " s left";
      setText(this.stateNote, note);
      this.row.classList.toggle("row-drained", state === "drained");

      setText(this.cells.in_flight, num(b.in_flight));
      setText(this.cells.rps, fmtRate(f.rps));
      setText(this.cells.error_rate, fmtPercent(f.errorRate));
      setTone(this.cells.error_rate, errorTone(f.errorRate));
      setText(this.cells.p50, fmtQuantile(f.p50));
      setText(this.cells.p99, fmtQuantile(f.p99));
      setText(this.cells.latency_estimate, fmtSeconds(num(b.latency_estimate_s)));
      const eff = fmtWeight(b.effective_weight);
      const conf = fmtWeight(b.weight);
      setText(this.cells.weight, eff === conf ? conf : eff + " / " + conf);
      const failed = num(b.failures_total);
      setText(this.cells.requests_total, num(b.requests_total) + " (" + failed + " failed)");
      return state;
    }
  }

  /** One pool's panel: summary, backend table and recent errors. */
  class PoolPanel {
    constructor(name) {
      this.prev = null;
      this.rows = new Map(); // backend name -> BackendRow
      this.errorsKey = "";
      this.root = el("section", { class: "pool", "data-pool-panel": name });

      const head = el("div", { class: "pool-head" });
      head.appendChild(el("h2", null, name));
      this.strategy = el("span", { class: "muted", "data-field": "strategy" });
      this.panic = el("span", { class: "badge badge-red", "data-field": "panic" }, "panic");
      this.panic.title = "Too few backends are available: balancing over all of them";
      this.panic.hidden = true;
      head.append(this.strategy, this.panic);

      const stats = el("dl", { class: "pool-stats" });
      const stat = (field, label) => {
        const wrap = el("div");
        const dd = el("dd", { "data-field": field }, DASH);
        wrap.append(el("dt", null, label), dd);
        stats.appendChild(wrap);
        return dd;
      };
      this.available = stat("available_count", "available");
      this.rps = stat("rps", "req/s");
      this.errorRate = stat("error_rate", "errors");
      this.retries = stat("retries_per_s", "retries/s");
      this.queue = stat("queue_depth", "queued");
      head.appendChild(stats);
      this.root.appendChild(head);

      const wrap = el("div", { class: "table-wrap" });
      const table = el("table", { class: "backends" });
      const tr = el("tr");
      for (const [field, label] of BACKEND_COLUMNS) {
        tr.appendChild(el("th", NUMERIC.has(field) ? { class: "num" } : null, label));
      }
      table.appendChild(el("thead")).appendChild(tr);
      this.tbody = table.appendChild(el("tbody"));
      wrap.appendChild(table);
      this.root.appendChild(wrap);

      this.errorsTitle = el("h3", null, "Recent errors");
      this.noErrors = el("p", { class: "muted small" }, "None.");
      const errorsWrap = el("div", { class: "table-wrap errors-wrap" });
      this.errorsTable = el("table", { class: "errors" });
      const etr = el("tr");
      for (const label of ["Time", "Backend", "Status", "Type", "Message", "Request id"]) {
        etr.appendChild(el("th", null, label));
      }
      this.errorsTable.appendChild(el("thead")).appendChild(etr);
      this.errorsBody = el("tbody", { "data-field": "recent_errors" });
      this.errorsTable.appendChild(this.errorsBody);
      errorsWrap.appendChild(this.errorsTable);
      this.root.append(this.errorsTitle, this.noErrors, errorsWrap);
    }

    update(p, time) {
      const cur = sampleOf(p, time);
      // The pool's own request count is the sum of its answers by class.
      cur.requests = cur.classes.reduce((a, b) => a + b, 0);
      const f = windowFigures(this.prev, cur);
      this.prev = cur;

      setText(this.strategy, p.strategy || "");
      this.panic.hidden = !p.panicking;
      setText(this.rps, fmtRate(f.rps));
      setText(this.errorRate, fmtPercent(f.errorRate));
      setTone(this.errorRate, errorTone(f.errorRate));
      setText(this.retries, fmtRate(f.retriesPerS));
      setTone(this.retries, f.retriesPerS ? "warn" : "");
      setText(this.queue, num(p.queue_depth));
      setTone(this.queue, num(p.queue_depth) > 0 ? "warn" : "");

      const backends = Array.isArray(p.backends) ? p.backends : [];
      const seen = new Set();
      let available = 0;
      backends.forEach((b, i) => {
        const name = String(b.name);
        seen.add(name);
        let row = this.rows.get(name);
        if (!row) {
          row = new BackendRow(p.name, name);
          this.rows.set(name, row);
        }
        if (row.update(b, time) === "available" && b.available !== false) available += 1;
        placeAt(this.tbody, row.row, i);
      });
      for (const [name, row] of this.rows) {
        if (!seen.has(name)) {
          row.row.remove();
          this.rows.delete(name);
        }
      }
      setText(this.available, available + " / " + backends.length);
      const all = available === backends.length;
      setTone(this.available, all ? "" : available === 0 ? "bad" : "warn");

      this.renderErrors(Array.isArray(p.recent_errors) ? p.recent_errors : [], num(time));
    }

    renderErrors(errors, now) {
      // Newest first, at most MAX_ERRORS_SHOWN; whatever the API sends, the page holds no more.
      const shown = errors
        .filter((e) => e !== null && typeof e === "object")
        .sort((a, b) => num(b.time) - num(a.time))
        .slice(0, MAX_ERRORS_SHOWN);
      const key = shown
        .map((e) => [e.time, e.request_id, e.backend, e.status].join("|"))
        .join("\n");
      this.noErrors.hidden = shown.length > 0;
      this.errorsTable.hidden = shown.length === 0;
      const more = errors.length > shown.length;
      const count = more ? " (newest " + shown.length + " of " + errors.length + ")" : "";
      setText(this.errorsTitle, "Recent errors" + count);
      if (key === this.errorsKey) {
        for (const tr of this.errorsBody.children) this.refreshAge(tr, now);
        return;
      }
      this.errorsKey = key;
      const rows = shown.map((e) => {
        const tr = el("tr");
        const t = num(e.time);
        tr.dataset.time = String(t);
        const timeCell = el("td", { class: "nowrap" }, fmtClock(t));
        timeCell.appendChild(el("span", { class: "muted small age" }));
        const message = str(e.message, "").slice(0, MAX_MESSAGE_CHARS);
        const msgCell = el("td", { class: "message" }, message);
        msgCell.title = message; // the whole text on hover; the cell cuts it with an ellipsis
        tr.append(
          timeCell,
          el("td", null, str(e.backend, DASH)),
          el("td", { class: "num" }, str(e.status, DASH)),
          el("td", null, str(e.type, "")),
          msgCell,
          el("td", { class: "muted small" }, str(e.request_id, "")),
        );
        this.refreshAge(tr, now);
        return tr;
      });
      this.errorsBody.replaceChildren(...rows);
    }

    refreshAge(tr, now) {
      const age = Math.max(0, now - num(tr.dataset.time));
      const text = " " + (age < 90 ? Math.round(age) + " s ago" : fmtUptime(age) + " ago");
      setText(tr.querySelector(".age"), text);
    }
  }

  // ---- The page -----------------------------------------------------------------------------

  const panels = new Map(); // pool name -> PoolPanel
  const $ = (id) => document.getElementById(id);
  let lastUptime = null;
  let failures = 0;
  let lostSince = null;

  function render(state) {
    if (!state || !Array.isArray(state.pools)) {
      throw new Error("unexpected answer from the admin API");
    }
    const uptime = num(state.uptime_s);
    if (lastUptime !== null && uptime < lastUptime) {
      // The proxy restarted: its counters started again from zero, so old samples mean nothing.
      for (const panel of panels.values()) panel.root.remove();
      panels.clear();
    }
    lastUptime = uptime;

    setText($("version"), state.version ? "v" + state.version : "");
    setText($("uptime"), fmtUptime(uptime));
    setText($("updated"), fmtClock(state.time));
    $("banner-draining").hidden = !state.draining;

    const main = $("pools");
    const loading = $("loading");
    if (loading) loading.remove();
    const seen = new Set();
    state.pools.forEach((p, i) => {
      const name = String(p.name);
      seen.add(name);
      let panel = panels.get(name);
      if (!panel) {
        panel = new PoolPanel(name);
        panels.set(name, panel);
      }
      panel.update(p, state.time);
      placeAt(main, panel.root, i);
    });
    for (const [name, panel] of panels) {
      if (!seen.has(name)) {
        panel.root.remove();
        panels.delete(name);
      }
    }
  }

  function connectionOk() {
    failures = 0;
    lostSince = null;
    $("banner-lost").hidden = true;
    document.body.classList.remove("stale");
    setText($("status"), "live");
    $("status").className = "pill pill-live";
    document.title = "lb dashboard";
  }

  function connectionLost(err) {
    failures += 1;
    if (lostSince === null) lostSince = Date.now() / 1000;
    const reason =
      err && err.name === "AbortError"
        ? "no answer within " + POLL_TIMEOUT_MS / 1000 + " s"
        : String((err && err.message) || err);
    setText(
      $("banner-lost-detail"),
      "The admin API has not answered since " + fmtClock(lostSince) + " (" + failures +
        (failures === 1 ? " failed poll" : " failed polls") + "; last: " + reason + ").",
    );
    $("banner-lost").hidden = false;
    document.body.classList.add("stale");
    setText($("status"), "connection lost");
    $("status").className = "pill pill-lost";
    document.title = "(connection lost) lb dashboard";
  }

  // Resolved against this script's own URL (/dashboard/dashboard.js -> /api/v1/state), so the
  // dashboard also works when the admin listener sits behind a path prefix.
  const script = document.currentScript;
  const STATE_URL = new URL("../api/v1/state", (script && script.src) || location.href).href;

  async function poll() {
    const started = performance.now();
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), POLL_TIMEOUT_MS);
    try {
      const resp = await fetch(STATE_URL, {
        cache: "no-store",
        signal: abort.signal,
        headers: { Accept: "application/json" },
      });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      render(await resp.json());
      connectionOk();
    } catch (err) {
      connectionLost(err);
    } finally {
      clearTimeout(timer);
      // One poll at a time; the next starts a second after this one started.
      const wait = Math.max(200, POLL_INTERVAL_MS - (performance.now() - started));
      setTimeout(poll, wait);
    }
  }

  window.lbDashboard = { histogramQuantile, windowFigures, sampleOf, backendState, STATE_URL };
  poll();
})();

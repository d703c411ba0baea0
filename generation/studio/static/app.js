// smitin studio: a plain page over the JSON API (/api, documented at /docs). No build step.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const VOICE_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];

// A token given as ?token= is kept in a cookie the API reads; the address bar is cleaned.
(function keepToken() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token) {
    document.cookie = `studio_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
    url.searchParams.delete("token");
    history.replaceState(null, "", url);
  }
})();

function showError(text) {
  const box = $("#error");
  box.textContent = text;
  box.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))
      : `${response.status} ${response.statusText}`;
    throw new Error(detail);
  }
  return body;
}

// ------------------------------------------------------------------ tabs
$$(".tab").forEach((tab) => tab.addEventListener("click", () => {
  $$(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  $$(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
  showError("");
  if (tab.dataset.tab === "registry") loadRegistry();
}));

// ------------------------------------------------------------------ jobs
async function runJob(panel, submit, onDone) {
  const progress = $(".progress", panel);
  const bar = $(".bar", progress);
  const label = $("span", progress);
  const cancel = $(".cancel", panel);
  const buttons = $$("button[type=submit], button.primary, #steer-only", panel);
  showError("");
  buttons.forEach((b) => (b.disabled = true));
  progress.hidden = false;
  bar.style.width = "0%";
  label.textContent = "queued";
  let job;
  try {
    job = await submit();
  } catch (e) {
    showError(e.message);
    buttons.forEach((b) => (b.disabled = false));
    progress.hidden = true;
    return;
  }
  panel.dataset.job = job.id;
  if (cancel) {
    cancel.hidden = false;
    cancel.onclick = () => api(`/api/jobs/${job.id}`, { method: "DELETE" }).catch((e) => showError(e.message));
  }
  while (true) {
    await new Promise((r) => setTimeout(r, 400));
    try { job = await api(`/api/jobs/${job.id}`); } catch (e) { showError(e.message); break; }
    bar.style.width = `${Math.round(job.progress * 100)}%`;
    label.textContent = job.message && job.message !== job.status ? `${job.status}: ${job.message}` : job.status;
    if (job.status === "done") { onDone(job); break; }
    if (job.status === "failed") { showError(job.error); break; }
    if (job.status === "cancelled") { label.textContent = `cancelled (${job.message})`; break; }
  }
  if (cancel) cancel.hidden = true;
  buttons.forEach((b) => (b.disabled = false));
}

const fileUrl = (job, name) => `/api/jobs/${job.id}/files/${encodeURIComponent(name)}`;

// ------------------------------------------------------------------ steer
let CONFIG = { traits: ["drums"] };

async function loadConfig() {
  try { CONFIG = await api("/api/config"); } catch (e) { showError(e.message); }
  const sliders = $("#sliders");
  sliders.innerHTML = "";
  for (const trait of CONFIG.traits) {
    const wrap = document.createElement("label");
    wrap.className = "slider";
    wrap.innerHTML = `<span>${trait}</span><input type="range" min="-30" max="30" step="1" value="10" ` +
      `data-trait="${trait}" aria-label="${trait} strength"><output>+10</output>`;
    const input = $("input", wrap);
    const out = $("output", wrap);
    input.addEventListener("input", () => { out.textContent = (input.value > 0 ? "+" : "") + input.value; });
    sliders.appendChild(wrap);
  }
}

function steerForm(compare) {
  const form = $("#steer-form");
  const data = new FormData(form);
  const steer = {};
  $$("#sliders input").forEach((s) => { if (Number(s.value) !== 0) steer[s.dataset.trait] = Number(s.value); });
  data.set("steer", JSON.stringify(steer));
  data.set("compare", compare ? "true" : "false");
  if (!form.prompt.files.length) data.delete("prompt");
  return data;
}

function drawTrace(canvas, trace) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const h = (canvas.height = 140 * devicePixelRatio);
  ctx.clearRect(0, 0, w, h);
  const traits = Object.keys(trace);
  traits.forEach((trait, i) => {
    const t = trace[trait];
    const n = t.probability.length;
    const x = (k) => (k / Math.max(1, n - 1)) * (w - 20) + 10;
    const y = (p) => h - 10 - p * (h - 30);
    ctx.strokeStyle = "#999"; ctx.setLineDash([4, 4]); ctx.beginPath();
    ctx.moveTo(10, y(t.tau)); ctx.lineTo(w - 10, y(t.tau)); ctx.stroke(); ctx.setLineDash([]);
    ctx.fillStyle = "rgba(200, 85, 61, 0.25)";
    t.on.forEach((on, k) => { if (on) ctx.fillRect(x(k) - 1, 4 + 6 * i, 2, 8); });
    ctx.strokeStyle = `hsl(${10 + 120 * i}, 60%, 45%)`; ctx.lineWidth = 2 * devicePixelRatio; ctx.beginPath();
    t.probability.forEach((p, k) => (k ? ctx.lineTo(x(k), y(p)) : ctx.moveTo(x(k), y(p))));
    ctx.stroke();
    ctx.fillStyle = "#333"; ctx.font = `${11 * devicePixelRatio}px system-ui`;
    ctx.fillText(`${trait} ${t.strength > 0 ? "+" : ""}${t.strength}: probability per step (line), push on ` +
      `(ticks), stop threshold ${t.tau.toFixed(2)} (dashed)`, 14, h - 14 - 14 * i);
  });
  canvas.dataset.drawn = String(traits.length);
}

function drawHeatmap(canvas, accuracy) {
  const ctx = canvas.getContext("2d");
  const rows = accuracy.length, cols = accuracy[0].length, cell = 28 * devicePixelRatio;
  canvas.width = cols * cell + 60 * devicePixelRatio;
  canvas.height = rows * cell + 10;
  canvas.style.width = `${canvas.width / devicePixelRatio}px`;
  const flat = accuracy.flat(), lo = Math.min(...flat), hi = Math.max(...flat);
  accuracy.forEach((row, l) => row.forEach((a, hd) => {
    const v = (a - lo) / Math.max(1e-9, hi - lo);
    ctx.fillStyle = `hsl(${220 - 200 * v}, 70%, ${85 - 40 * v}%)`;
    ctx.fillRect(60 * devicePixelRatio + hd * cell, l * cell, cell - 2, cell - 2);
  }));
  ctx.fillStyle = "#333"; ctx.font = `${10 * devicePixelRatio}px system-ui`;
  accuracy.forEach((_, l) => ctx.fillText(`layer ${l}`, 2, l * cell + cell * 0.6));
  canvas.dataset.drawn = "1";
}

function showTakes(job) {
  const box = $("#takes");
  box.innerHTML = "";
  for (const take of job.result.takes) {
    const div = document.createElement("div");
    div.className = "take";
    div.innerHTML = `<h3 class="take-name">${take.name}</h3><audio controls preload="auto" src="${fileUrl(job, take.wav)}"></audio>` +
      `<img alt="spectrogram of the ${take.name} take" src="${fileUrl(job, take.spectrogram)}">` +
      (take.trace ? `<canvas class="trace" aria-label="monitor trace"></canvas>` : "") +
      `<p class="downloads"><a download href="${fileUrl(job, take.wav)}">WAV</a>` +
      (take.report ? `<a download href="${fileUrl(job, take.report)}">steering report (JSON)</a>` : "") + `</p>`;
    box.appendChild(div);
    if (take.trace) drawTrace($("canvas", div), take.trace);
  }
  const maps = $("#heatmaps");
  maps.innerHTML = "";
  for (const [trait, ps] of Object.entries(job.result.probe_sets || {})) {
    const div = document.createElement("div");
    div.className = "take";
    div.innerHTML = `<h3>${trait} probes: validation accuracy per head (${ps.label})</h3><canvas class="heatmap"></canvas>`;
    maps.appendChild(div);
    drawHeatmap($("canvas", div), ps.accuracy);
  }
}

$("#steer-form").addEventListener("submit", (e) => {
  e.preventDefault();
  runJob($("#steer"), () => api("/api/steer", { method: "POST", body: steerForm(true) }), showTakes);
});
$("#steer-only").addEventListener("click", () =>
  runJob($("#steer"), () => api("/api/steer", { method: "POST", body: steerForm(false) }), showTakes));

// ------------------------------------------------------------------ harmonize
function drawRoll(canvas, roll, given) {
  const ctx = canvas.getContext("2d");
  const T = roll[0].length;
  const pitches = roll.flat().filter((p) => p >= 0);
  const lo = Math.min(...pitches) - 2, hi = Math.max(...pitches) + 2;
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const h = (canvas.height = 260 * devicePixelRatio);
  const cw = w / T, ch = h / (hi - lo + 1);
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#e3e6ec";
  for (let t = 0; t <= T; t += 16) { ctx.beginPath(); ctx.moveTo(t * cw, 0); ctx.lineTo(t * cw, h); ctx.stroke(); }
  // equal consecutive frames of a voice are one note (as in the MIDI the studio writes)
  roll.forEach((line, v) => {
    let t = 0;
    while (t < T) {
      let e = t + 1;
      while (e < T && line[e] === line[t] && given[v][e] === given[v][t]) e++;
      const p = line[t];
      if (p >= 0) {
        const kept = given[v][t] === 1, y = h - (p - lo + 1) * ch;
        ctx.globalAlpha = kept ? 1 : 0.55;
        ctx.fillStyle = VOICE_COLORS[v % 4];
        ctx.fillRect(t * cw, y, (e - t) * cw - 1, ch * 0.8);
        if (kept) { ctx.globalAlpha = 1; ctx.strokeStyle = "#000"; ctx.strokeRect(t * cw, y, (e - t) * cw - 1, ch * 0.8); }
      }
      t = e;
    }
  });
  ctx.globalAlpha = 1;
  canvas.dataset.drawn = "1";
}

$("#harmonize-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const form = e.target;
  const data = new FormData(form);
  if (!form.score.files.length) data.delete("score");
  if (!data.get("voices")) data.delete("voices");
  if (!data.get("temperature")) data.delete("temperature");
  runJob($("#harmonize"), () => api("/api/harmonize", { method: "POST", body: data }), (job) => {
    const r = job.result, f = r.files;
    const box = $("#chorale");
    box.innerHTML = `<canvas class="roll" aria-label="piano roll"></canvas>` +
      `<p>${r.info.task} with ${r.info.model}: ${r.info.sampler}, ${r.info.steps} steps, seed ${r.info.seed}, ` +
      `${r.info.seconds.toFixed(1)} s. Solid notes with a black edge were given; lighter ones were written.</p>` +
      `<audio controls preload="auto" src="${fileUrl(job, f.wav)}"></audio>` +
      `<p class="downloads"><a download href="${fileUrl(job, f.midi)}">MIDI</a>` +
      `<a download href="${fileUrl(job, f.musicxml)}">MusicXML</a><a download href="${fileUrl(job, f.wav)}">WAV</a>` +
      `<a href="${fileUrl(job, f.png)}" target="_blank">piano roll (PNG)</a></p>`;
    drawRoll($("canvas", box), r.roll, r.given);
  });
});

// ------------------------------------------------------------------ listen
$("#listen-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const data = new FormData(e.target);
  runJob($("#listen"), () => api("/api/listen", { method: "POST", body: data }), (job) => {
    const r = job.result;
    const box = $("#readings");
    box.innerHTML = "";
    for (const [trait, x] of Object.entries(r.readings)) {
      box.insertAdjacentHTML("beforeend", `<p class="reading" data-trait="${trait}"><b>${trait}</b>: the probes read ` +
        `${(100 * x.probability).toFixed(0)}% (${x.present ? "present" : "absent"} at their threshold ` +
        `${x.tau.toFixed(2)}; best head ${(100 * x.best_head).toFixed(0)}%; ${x.probe_set})</p>`);
    }
    if (r.detector) {
      box.insertAdjacentHTML("beforeend", `<p class="reading detector"><b>independent ${r.detector.trait} detector</b>: ` +
        `${(100 * r.detector.probability).toFixed(0)}% (${r.detector.present ? "present" : "absent"})</p>`);
    }
  });
});

// ------------------------------------------------------------------ data
async function loadClips(e) {
  if (e) e.preventDefault();
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#data-form"))) if (v) params.set(k, v);
  showError("");
  try {
    const page = await api(`/api/clips?${params}`);
    $("#clips-count").textContent = `${page.total} clips match; showing ${page.rows.length}`;
    const body = $("#clips tbody");
    body.innerHTML = "";
    for (const row of page.rows) {
      const tr = document.createElement("tr");
      const traits = Object.entries(row.traits).filter(([, v]) => v).map(([k]) => k).join(", ");
      tr.innerHTML = `<td>${row.clip_id}</td><td>${row.split}</td><td>${row.tempo_bpm ? row.tempo_bpm.toFixed(0) : "-"}</td>` +
        `<td>${row.key || "-"} ${row.mode || ""}</td><td>${traits}</td><td></td><td><button>play</button></td>`;
      tr.children[5].textContent = row.caption;
      $("button", tr).addEventListener("click", () => {
        const player = $("#clip-player");
        player.hidden = false;
        player.src = `/api/clips/${row.clip_id}/audio`;
        player.play().catch(() => {});
      });
      body.appendChild(tr);
    }
  } catch (err) { showError(err.message); }
}
$("#data-form").addEventListener("submit", loadClips);

// ------------------------------------------------------------------ registry
async function loadRegistry() {
  const box = $("#models");
  try {
    const reg = await api("/api/registry");
    box.innerHTML = `<p>${reg.tracking_uri}</p>`;
    for (const m of reg.models) {
      const div = document.createElement("div");
      div.className = "model";
      const rows = m.versions.map((v) => `<tr><td>v${v.version}</td><td>${v.aliases.map((a) =>
        `<span class="alias ${a}">${a}</span>`).join("")}</td><td>${Object.entries(v.metrics).map(([k, x]) =>
        `${k} ${Number(x).toFixed(3)}`).join("; ")}</td><td>${Object.entries(v.lineage).map(([k, x]) =>
        `${k} ${String(x).slice(0, 12)}`).join("; ")}</td><td>${v.aliases.includes("champion") ? "" :
        `<button data-model="${m.name}" data-version="${v.version}">promote</button>`}</td></tr>`).join("");
      div.innerHTML = `<h3>${m.name}</h3><table><tbody>${rows}</tbody></table>`;
      box.appendChild(div);
    }
    $$("button[data-model]", box).forEach((b) => b.addEventListener("click", () => promote(b.dataset.model, b.dataset.version)));
  } catch (e) { showError(e.message); }
}
$("#registry-refresh").addEventListener("click", loadRegistry);

async function promote(model, version) {
  const form = new FormData();
  form.set("model", model); form.set("version", version); form.set("confirm", "false");
  let check;
  try { check = await api("/api/registry/promote", { method: "POST", body: form }); } catch (e) { return showError(e.message); }
  const dialog = $("#promote-dialog");
  $("#promote-text").textContent = check.refused ? `${model} v${version} would be refused: ${check.refused}`
    : `Promote ${model} v${version} to champion?`;
  $("#promote-gates").innerHTML = (check.gates || []).map((g) => `<li>${g.passed ? "ok" : "FAILED"}: ${g.name} (${g.detail})</li>`).join("");
  $("#promote-confirm").hidden = Boolean(check.refused) || (check.gates || []).some((g) => !g.passed);
  dialog.onclose = async () => {
    if (dialog.returnValue !== "confirm") return;
    form.set("confirm", "true");
    try {
      const done = await api("/api/registry/promote", { method: "POST", body: form });
      if (done.refused) showError(done.refused);
      await loadRegistry();
    } catch (e) { showError(e.message); }
  };
  dialog.showModal();
}

loadConfig();

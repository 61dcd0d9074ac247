// melbo serve's explorer: model text is always shown with textContent, never parsed as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let runs = [];
let model = "";
const MAX_VECTORS = 12;

async function load() {
  const answer = await fetch("/v1/runs");
  const body = await answer.json();
  runs = body.data;
  model = body.model;
  for (const run of runs) {
    const option = document.createElement("option");
    option.value = run.name;
    option.textContent = `${run.name} (${run.kind}, ${run.count} vectors, layer ${run.layer})`;
    $("run").appendChild(option);
  }
  const wanted = new URLSearchParams(location.search).get("run");
  if (wanted && runs.some((r) => r.name === wanted)) $("run").value = wanted;
  showRun();
}

function currentRun() {
  return runs.find((r) => r.name === $("run").value);
}

function showRun() {
  const run = currentRun();
  if (!run) return;
  const labels = [...new Set(run.vectors.map((v) => v.label).filter((l) => l))];
  $("label").replaceChildren(new Option("—", ""), ...labels.map((l) => new Option(`${l} (${run.vectors.filter((v) => v.label === l).length})`, l)));
  $("runinfo").textContent = ` vectors 0 to ${run.count - 1}${run.kind === "ortho" ? "; 0 is the base" : ""}`;
  $("report").hidden = !run.report;
  $("report").href = `/runs/${encodeURIComponent(run.name)}/report`;
}

function chosen(run) {
  const typed = $("indices").value.split(/[ ,]+/).filter((s) => s !== "").map(Number);
  if (typed.some((i) => !Number.isInteger(i) || i < 0 || i >= run.count)) throw new Error(`vectors are 0 to ${run.count - 1}`);
  let picked = typed;
  if (!picked.length && $("label").value) picked = run.vectors.filter((v) => v.label === $("label").value).map((v) => v.index);
  if (!picked.length && Number($("first").value) > 0) picked = run.vectors.slice(0, Number($("first").value)).map((v) => v.index);
  if (!picked.length) throw new Error("choose vectors: indices, a label, or the first N");
  return picked.slice(0, MAX_VECTORS);
}

function column(title, unsteered) {
  const box = document.createElement("div");
  box.className = "column" + (unsteered ? " unsteered" : "");
  const head = document.createElement("h2");
  head.textContent = title;
  const text = document.createElement("pre");
  const status = document.createElement("div");
  status.className = "status";
  status.textContent = "waiting…";
  box.append(head, text, status);
  $("columns").appendChild(box);
  return { text, status };
}

async function stream(endpoint, body, target) {
  const answer = await fetch(endpoint, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ...body, stream: true }),
  });
  if (!answer.ok) {
    const problem = await answer.json().catch(() => ({ error: { message: answer.statusText } }));
    target.status.textContent = problem.error.message;
    target.status.classList.add("error");
    return;
  }
  target.status.textContent = "streaming…";
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (line === "[DONE]") { target.status.textContent = target.status.textContent.replace("streaming…", "done"); continue; }
      const chunk = JSON.parse(line);
      if (chunk.error) { target.status.textContent = chunk.error.message; target.status.classList.add("error"); continue; }
      const choice = chunk.choices[0];
      const piece = choice.delta ? choice.delta.content : choice.text;  // chat chunks carry a delta, raw ones text
      if (piece) target.text.textContent += piece;
      if (choice.finish_reason) target.status.textContent = `done (${choice.finish_reason})`;
    }
  }
}

async function compare(event) {
  event.preventDefault();
  $("message").textContent = "";
  const run = currentRun();
  let picked;
  try {
    picked = chosen(run);
  } catch (problem) {
    $("message").textContent = problem.message;
    return;
  }
  $("columns").replaceChildren();
  // the run's own prompt format: its chat template and system prompt, or raw text (a base model: /v1/completions)
  const text = $("prompt").value;
  const endpoint = run.chat_template ? "/v1/chat/completions" : "/v1/completions";
  const asked = run.chat_template
    ? { messages: [...(run.system !== null ? [{ role: "system", content: run.system }] : []), { role: "user", content: text }] }
    : { prompt: run.system !== null ? `${run.system}\n\n${text}` : text };
  const common = { model, ...asked, temperature: Number($("temperature").value), max_tokens: Number($("tokens").value) };
  const jobs = [stream(endpoint, common, column("unsteered", true))];
  for (const index of picked) {
    const vector = run.vectors[index];
    const title = `#${index}${vector.label ? " · " + vector.label : ""} · norm ${vector.norm.toFixed(1)}${Number($("scale").value) !== 1 ? " × " + $("scale").value : ""}`;
    jobs.push(stream(endpoint, { ...common, melbo: { run: run.name, vector: index, scale: Number($("scale").value) } }, column(title, false)));
  }
  await Promise.all(jobs);
}

$("run").addEventListener("change", showRun);
$("controls").addEventListener("submit", compare);
load();

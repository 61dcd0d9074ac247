"use strict";
// The vector table: filter by label, search text, sort by a column, 100 rows per page.
// Every piece of model text is put in the page with textContent, never as HTML.
(function () {
  const data = JSON.parse(document.getElementById("melbo-data").textContent);
  const rows = data.rows;
  const PAGE = 100;
  for (const row of rows) {
    const parts = [];
    for (const c of row.completions) parts.push(c.text);
    for (const t of row.top) parts.push(t[0]);
    row._haystack = parts.join("\n").toLowerCase();
  }
  const state = { label: "", query: "", key: "index", dir: 1, page: 0, open: new Set() };
  const body = document.getElementById("rows");
  const filter = document.getElementById("label-filter");
  const search = document.getElementById("search");
  const count = document.getElementById("count");
  const pageInfo = document.getElementById("page");

  for (const name of data.labels) {
    const n = rows.filter((r) => r.label === name).length;
    if (!n) continue;
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name + " (" + n + ")";
    filter.appendChild(option);
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  // A completion; an empty or blank one (the model ended at once) reads "(no text)", not as an empty cell.
  function completion(text, preview) {
    // a closed row's few visible lines start at the first line with text (a completion may open with blank lines)
    const shown = preview ? text.replace(/^(\s*\n)+/, "") : text;
    return text.trim() ? el("pre", "completion", shown) : el("pre", "completion empty", "(no text)");
  }
  function fmt(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }
  function compare(a, b) {
    const x = a[state.key], y = b[state.key];
    if (x === y) return a.index - b.index;
    if (x === null || x === undefined) return 1;  // missing values last, whichever direction
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * state.dir;
  }
  function visible() {
    const q = state.query;
    const out = rows.filter((r) => (!state.label || r.label === state.label) && (!q || r._haystack.includes(q)));
    return out.sort(compare);
  }
  // The concept judge's ratings of one completion, and its own words on the concept (the sample to check it by).
  function judged(parent, c) {
    for (const [name, r] of Object.entries(c.judge || {})) {
      const rating = (v) => (v === null || v === undefined ? "—" : String(v));
      const line = el("div", "judge", "judge · " + name + ": concept " + rating(r.concept) + ", instruction " + rating(r.instruction) + ", fluency " + rating(r.fluency));
      if (r.answer) {
        const why = el("details");
        why.appendChild(el("summary", "", "the judge's answer"));
        why.appendChild(el("pre", "completion", r.answer));
        line.appendChild(why);
      }
      parent.appendChild(line);
    }
  }
  function rowNodes(row) {
    const tr = el("tr", "row" + (row.base ? " base" : "") + (state.open.has(row.index) ? " open" : ""));
    tr.dataset.index = row.index;
    tr.appendChild(el("td", "num", String(row.index) + (row.base ? " (base)" : "")));
    tr.appendChild(el("td", "num", fmt(row.norm, 2)));
    tr.appendChild(el("td", "num", fmt(row.kl, 3)));
    const lab = el("td");
    if (row.label) lab.appendChild(el("span", "label " + row.label, row.label));
    tr.appendChild(lab);
    tr.appendChild(el("td", "top", row.top.map((t) => JSON.stringify(t[0])).join(" ")));
    const cell = el("td");
    const first = row.completions[0];
    cell.appendChild(first ? completion(first.text, !state.open.has(row.index)) : el("pre", "completion", ""));
    if (state.open.has(row.index)) {
      if (first) judged(cell, first);
      if (row.top.length) cell.appendChild(el("div", "more", "top 5: " + row.top.map((t) => JSON.stringify(t[0]) + " " + fmt(t[1], 2)).join(", ")));
      for (const c of row.completions.slice(1)) {
        const box = el("div", "more");
        box.appendChild(el("span", "prompt", c.prompt + " [" + c.mode + ", " + c.label + "]"));
        box.appendChild(completion(c.text));
        judged(box, c);
        cell.appendChild(box);
      }
      const extra = [];
      if (row.loss !== null && row.loss !== undefined) extra.push("loss " + fmt(row.loss, 4));
      if (row.z !== null && row.z !== undefined) extra.push("presence z " + fmt(row.z, 2));
      if (row.generalisation !== null && row.generalisation !== undefined) extra.push("generalises on " + fmt(100 * row.generalisation, 0) + "% of held-out prompts");
      if (extra.length) cell.appendChild(el("div", "more", extra.join(" · ")));
    } else if (row.completions.length > 1) {
      cell.appendChild(el("div", "more", "+" + (row.completions.length - 1) + " more completion(s)"));
    }
    tr.appendChild(cell);
    return tr;
  }
  function render() {
    const shown = visible();
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const slice = shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
    const fragment = document.createDocumentFragment();
    for (const row of slice) fragment.appendChild(rowNodes(row));
    body.replaceChildren(fragment);
    count.textContent = shown.length + " of " + rows.length + " vectors";
    pageInfo.textContent = " page " + (state.page + 1) + " / " + pages + " ";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
    for (const th of document.querySelectorAll("th[data-key]")) {
      const on = th.dataset.key === state.key;
      th.classList.toggle("sorted", on);
      th.dataset.dir = on ? (state.dir > 0 ? " ▲" : " ▼") : "";
    }
  }

  filter.addEventListener("change", () => { state.label = filter.value; state.page = 0; render(); });
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.query = search.value.trim().toLowerCase(); state.page = 0; render(); }, 120);
  });
  document.getElementById("prev").addEventListener("click", () => { state.page -= 1; render(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; render(); });
  for (const th of document.querySelectorAll("th[data-key]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.dir = state.key === key ? -state.dir : (key === "index" || key === "label" ? 1 : -1);
      state.key = key;
      state.page = 0;
      render();
    });
  }
  body.addEventListener("click", (event) => {
    const tr = event.target.closest("tr.row");
    if (!tr || event.target.closest("details")) return;  // the judge's answer opens by itself, the row stays open
    const index = Number(tr.dataset.index);
    if (state.open.has(index)) state.open.delete(index); else state.open.add(index);
    tr.replaceWith(rowNodes(rows.find((r) => r.index === index)));
  });
  render();
  document.body.dataset.ready = "1";
})();

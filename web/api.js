// Renders /openapi.json as a reference page (no CDN, no framework).
const doc = await (await fetch("/openapi.json")).json();
const root = document.getElementById("api");
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text) e.textContent = text; if (cls) e.className = cls; return e; };
const ref = (schema) => schema?.$ref ? schema.$ref.split("/").pop() : schema?.type === "array" ? `[${ref(schema.items)}]` : schema?.type ?? "";
document.getElementById("title").textContent = `${doc.info.title} ${doc.info.version} — OpenAPI ${doc.openapi}`;
document.getElementById("intro").textContent = doc.info.description;
for (const [path, item] of Object.entries(doc.paths)) {
  for (const [method, op] of Object.entries(item)) {
    const section = el("section");
    section.append(el("h2", `${method.toUpperCase()} ${path}`));
    if (op.description || op.summary) section.append(el("p", op.summary ?? op.description));
    for (const p of op.parameters ?? []) section.append(el("p", `${p.in} ${p.name}${p.required ? " (required)" : ""}: ${p.description ?? ""}`, "param"));
    const body = op.requestBody?.content;
    if (body) section.append(el("p", `body: ${Object.entries(body).map(([t, c]) => `${ref(c.schema)} as ${t}`).join(", ")}`, "param"));
    const table = el("table");
    for (const [status, r] of Object.entries(op.responses)) {
      const tr = el("tr");
      const content = Object.entries(r.content ?? {}).map(([t, c]) => `${ref(c.schema)} (${t})`).join(", ");
      tr.append(el("td", status), el("td", r.description), el("td", content));
      table.append(tr);
    }
    section.append(table);
    root.append(section);
  }
}
const schemas = el("section");
schemas.append(el("h2", "Schemas"));
schemas.append(el("pre", JSON.stringify(doc.components?.schemas ?? {}, null, 2)));
root.append(schemas);

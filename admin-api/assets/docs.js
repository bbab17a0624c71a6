// Renders /openapi.json as a browsable reference: operations grouped by tag, with their
// parameters, request body and responses (schemas expanded from #/components/schemas).
(async function () {
  const root = document.getElementById("root");
  const doc = await (await fetch("/openapi.json")).json();
  const schemas = (doc.components && doc.components.schemas) || {};
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const k of kids) e.append(k);
    return e;
  };
  const resolve = (s, depth) => {
    if (!s || depth > 6) return s;
    if (s.$ref) return resolve(schemas[s.$ref.split("/").pop()], depth + 1);
    const out = Array.isArray(s) ? [] : {};
    for (const [k, v] of Object.entries(s)) out[k] = typeof v === "object" && v !== null ? resolve(v, depth + 1) : v;
    return out;
  };
  const example = (s, depth) => {
    s = resolve(s, 0);
    if (!s || depth > 5) return null;
    if (s.oneOf || s.anyOf) return example((s.oneOf || s.anyOf).find(x => x.type !== "null"), depth + 1);
    const t = Array.isArray(s.type) ? s.type.find(x => x !== "null") : s.type;
    if (t === "object" || s.properties) {
      const o = {};
      for (const [k, v] of Object.entries(s.properties || {})) o[k] = example(v, depth + 1);
      return o;
    }
    if (t === "array") return [example(s.items, depth + 1)];
    if (t === "integer" || t === "number") return 0;
    if (t === "boolean") return false;
    return "string";
  };
  root.textContent = "";
  root.append(el("h1", {}, doc.info.title), el("p", {}, doc.info.description || ""));
  const byTag = {};
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags && op.tags[0]) || "other";
      (byTag[tag] = byTag[tag] || []).push([method, path, op]);
    }
  }
  for (const t of doc.tags || []) if (!byTag[t.name]) byTag[t.name] = [];
  for (const [tag, ops] of Object.entries(byTag)) {
    const info = (doc.tags || []).find(t => t.name === tag);
    root.append(el("h2", {}, tag), el("p", {}, info ? info.description || "" : ""));
    for (const [method, path, op] of ops) {
      const summary = el("summary", {},
        el("span", { class: "m " + method }, method.toUpperCase()),
        el("span", { class: "p" }, path),
        el("span", {}, op.summary || ""),
        op.security ? el("span", { class: "lock" }, "requires sign-in") : "");
      const body = el("div", { class: "body" });
      if (op.description) body.append(el("p", {}, op.description));
      if (op.parameters && op.parameters.length) {
        const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "description")));
        for (const p of op.parameters) table.append(el("tr", {}, el("td", { class: "p" }, p.name + (p.required ? " *" : "")), el("td", {}, p.in), el("td", {}, p.description || "")));
        body.append(el("h4", {}, "Parameters"), table);
      }
      const req = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
      if (req) body.append(el("h4", {}, "Request body"), el("pre", {}, JSON.stringify(example(req.schema, 0), null, 2)));
      body.append(el("h4", {}, "Responses"));
      for (const [code, r] of Object.entries(op.responses || {})) {
        const c = r.content && r.content["application/json"];
        body.append(el("p", {}, el("strong", {}, code + " "), r.description || ""));
        if (c) body.append(el("pre", {}, JSON.stringify(example(c.schema, 0), null, 2)));
      }
      root.append(el("details", {}, summary, body));
    }
  }
})();

// Opens the document view (`<stream>.json`) with a real EventSource in headless Debian
// Chromium, keeps an HTML table in sync with `put`/`patch` (the README's example), and reports
// the rendered table after every event.
//
// Usage: node docview.mjs <origin> <stream path>
// Prints one JSON line per event: {"type":"put"|"patch","rows":[["<id>","<name>","<score>"],…]}.
// Runs until killed, or 120 s at most.
import { launch, say } from "./chromium.mjs";

const [origin, path] = process.argv.slice(2);

const browser = await launch();
const page = await browser.newPage();
await page.exposeFunction("report", say);
await page.goto(`${origin}/health/live`);
await page.evaluate((path) => {
  document.body.innerHTML = "<table><tbody id=rows></tbody></table>";
  // The README's example, as a page would use it.
  const docs = {};
  const set = (path, value) => {
    const keys = path.split("/").filter(Boolean);
    if (keys.length === 0) { Object.keys(docs).forEach((k) => delete docs[k]); Object.assign(docs, value || {}); return; }
    let node = docs;
    for (const key of keys.slice(0, -1)) node = node[key] ??= {};
    const last = keys[keys.length - 1];
    if (value === null) delete node[last]; else node[last] = value;
  };
  const render = () => {
    document.getElementById("rows").innerHTML = Object.entries(docs).map(([id, d]) =>
      `<tr><td>${id}</td><td>${d.name ?? ""}</td><td>${d.score ?? ""}</td></tr>`).join("");
  };
  const rows = () => [...document.querySelectorAll("#rows tr")].map((tr) =>
    [...tr.children].map((td) => td.textContent));
  const source = new EventSource(path + ".json");
  source.addEventListener("put", (e) => {
    const { path, data } = JSON.parse(e.data);
    set(path, data); render(); window.report({ type: "put", path, rows: rows() });
  });
  source.addEventListener("patch", (e) => {
    const { path, data } = JSON.parse(e.data);
    for (const [child, value] of Object.entries(data)) set(`${path}/${child}`, value);
    render(); window.report({ type: "patch", path, rows: rows() });
  });
}, path);
setTimeout(async () => { await browser.close(); process.exit(0); }, 120_000);

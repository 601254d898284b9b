// The library in real Chromium (Debian's, driven by playwright-core from tests/browser; never a
// downloaded browser): a page renders a live table from liveCollection, and the table still
// equals the collection after Streamgate is killed (-9) and started again.
//
// The page is served from Streamgate's own origin (playwright answers /__client/* from dist/),
// so the browser makes the same same-origin requests an app behind one host would.
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { REPO, Streamgate, eventually, missingBinaries, prerequisite, probe, uniqueDb, mongodForFile } from "./harness.mjs";

const DIST = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../dist");
const PLAYWRIGHT = path.join(REPO, "tests/browser/node_modules/playwright-core/index.mjs");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

const skip =
  missingBinaries() ??
  prerequisite(!fs.existsSync(PLAYWRIGHT) ? `needs ${PLAYWRIGHT} (cd tests/browser && npm ci; scripts/test does it)` : undefined) ??
  prerequisite(!fs.existsSync(CHROMIUM) ? `needs Chromium at ${CHROMIUM} (apt-get install chromium)` : undefined);
if (skip) console.log(`# SKIPPED: ${skip}`);

const shared = mongodForFile(skip);

const PAGE = (stream) => `<!doctype html>
<meta charset="utf-8">
<title>live table</title>
<p id="status">starting</p>
<table><tbody id="rows"></tbody></table>
<script type="module">
  import { liveCollection } from "/__client/index.js";
  window.states = [];
  const live = liveCollection(location.origin + ${JSON.stringify(stream)}, { retryMs: 300, maxRetryMs: 1000 });
  live.on("state", (s) => {
    window.states.push(s.state);
    document.getElementById("status").textContent = s.state;
  });
  live.on("failure", (f) => console.log("failure " + JSON.stringify(f)));
  live.on("data", (docs) => {
    const rows = [...docs].sort(([a], [b]) => Number(a) - Number(b)).map(([id, doc]) => {
      const tr = document.createElement("tr");
      for (const text of [id, String(doc.label ?? ""), String(doc.n ?? "")]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    });
    document.getElementById("rows").replaceChildren(...rows);
  });
</script>`;

test("Chromium: a live table from liveCollection survives a Streamgate restart", { skip, timeout: 180_000 }, async () => {
  const { chromium } = await import(PLAYWRIGHT);
  const db = uniqueDb("js_browser");
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "c", name: "s" }], retryMs: 300 });
  const stream = `/${db}/c/_streams/s`;
  // With snapshots the table starts from existing documents; without (server not there yet),
  // from an empty collection, which changes alone describe completely.
  const noSnapshot = await probe(sg, "snapshot", stream);
  if (noSnapshot) console.log(`# NOTE: ${noSnapshot}; the table starts from an empty collection`);
  else await shared.mongod.client.insert(db, "c", Array.from({ length: 10 }, (_, i) => ({ _id: i, label: `seed${i}`, n: i })));

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    page.on("console", (m) => console.log(`# page: ${m.text()}`));
    await page.route(`${sg.origin}/__client/**`, (route) => {
      const name = new URL(route.request().url()).pathname.slice("/__client/".length);
      if (name === "page.html") return route.fulfill({ contentType: "text/html", body: PAGE(stream) });
      const file = path.join(DIST, path.basename(name));
      if (!fs.existsSync(file)) return route.fulfill({ status: 404, body: "" });
      return route.fulfill({ contentType: "text/javascript", body: fs.readFileSync(file, "utf8") });
    });
    await page.goto(`${sg.origin}/__client/page.html`);
    await eventually("the page is connected", 20_000, async () => (await page.textContent("#status")) === "open").catch(async (e) => {
      throw new Error(`${e.message}; status ${await page.textContent("#status")}; page errors ${errors}`);
    });

    const table = () => page.$$eval("#rows tr", (rows) => rows.map((r) => [...r.children].map((td) => td.textContent)));
    const expected = async () =>
      (await shared.mongod.client.find(db, "c")).sort((a, b) => a._id - b._id).map((d) => [String(d._id), String(d.label ?? ""), String(d.n ?? "")]);
    const sameAsCollection = async (what) => {
      let want;
      await eventually(what, 30_000, async () => JSON.stringify(await table()) === JSON.stringify((want = await expected()))).catch(() => undefined);
      assert.deepEqual(await table(), want, what);
    };

    for (let i = 10; i < 30; i++) await shared.mongod.client.insert(db, "c", [{ _id: i, label: `row${i}`, n: i }]);
    await shared.mongod.client.update(db, "c", { _id: 12 }, { $set: { label: "changed" } });
    await shared.mongod.client.delete(db, "c", { _id: 13 });
    await sameAsCollection("the table shows the collection");
    assert.ok((await table()).length >= 19);

    await sg.kill9();
    await eventually("the page noticed the server is gone", 20_000, async () => (await page.textContent("#status")) !== "open");
    // Changes while Streamgate is down reach the page after the restart, from its last id.
    for (let i = 30; i < 40; i++) await shared.mongod.client.insert(db, "c", [{ _id: i, label: `down${i}`, n: i }]);
    await shared.mongod.client.update(db, "c", { _id: 14 }, { $set: { n: 1400 } });
    await shared.mongod.client.delete(db, "c", { _id: 15 });
    await sg.launch();
    await sameAsCollection("the table shows the collection after the restart");
    for (let i = 40; i < 45; i++) await shared.mongod.client.insert(db, "c", [{ _id: i, label: `after${i}`, n: i }]);
    await sameAsCollection("and stays live");
    const states = await page.evaluate(() => window.states);
    assert.ok(states.filter((s) => s === "open").length >= 2, `reconnected: ${states}`);
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
    await sg.stop();
  }
});

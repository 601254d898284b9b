// The compatibility suite: clients nobody here wrote, each at a pinned version, driven against
// a real Streamgate (the test build's binary) and mongod, then checked against the collection.
//
//   node tests/compat/run.mjs           run, and fail if docs/compatibility.md's matrix differs
//   node tests/compat/run.mjs --write   run, and rewrite the matrix in docs/compatibility.md
//
// tests/compat/run installs the clients (npm ci here, a venv under .cache/compat) and calls this.
//
// Two scenarios run at once, each on its own Streamgate and database of one mongod:
// - main (auth off): documents seeded, every client connected and holding the initial state
//   (first `put` / `snapshot`…`ready`), then a random writer; halfway through Streamgate is
//   killed with SIGKILL, the writer goes on while it is down, and it is started again on the
//   same port. An end marker (_id "~end") closes the writing: each client reports its state,
//   which must equal the collection, and how many changes it saw, which must equal the writes
//   (every change exactly once, in order). Then the stream is deleted: each client must see
//   `cancel`.
// - auth (auth on, HS256 tokens that live TOKEN_SECS): the same without the kill; tokens
//   expire under the writer, so each client must get `auth_revoked` and come back with a fresh
//   token (token refresh) and still end equal to the collection.
// The matrix (docs/compatibility.md) is rendered from what was observed, so it cannot drift.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { MongoD, Streamgate, SECRET, eventually, freePort } from "../../clients/js/test/it/harness.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../..");
const DOC = path.join(REPO, "docs/compatibility.md");
const PYTHON = process.env.COMPAT_PYTHON || path.join(REPO, ".cache/compat/venv/bin/python");
const WRITES = 120; // changes by the random writer (plus the end marker)
const TOKEN_SECS = 3; // tokens live TOKEN_SECS to TOKEN_SECS + 1 s
const WAIT = 40_000;

/** The clients, in the matrix's order. `expect` is what each scenario must show. */
const CLIENTS = [
  { name: "firebase-admin `Reference.listen`", pkg: ["py", "firebase_admin"], transport: "Firebase REST (`.json`)", file: "firebase_admin_listen.py", stream: "all", view: true, token: "emulator" },
  { name: "Pyrebase4 `stream()`", pkg: ["py", "Pyrebase4"], transport: "Firebase REST (`.json`)", file: "pyrebase_stream.py", stream: "all", view: true },
  { name: "Chromium `EventSource`", pkg: ["deb", "chromium"], transport: "SSE", browser: true },
  { name: "`eventsource` (npm)", pkg: ["npm", "eventsource"], transport: "SSE", file: "eventsource.mjs", stream: "all" },
  { name: "`@microsoft/fetch-event-source`", pkg: ["npm", "@microsoft/fetch-event-source"], transport: "SSE", file: "fetch_event_source.mjs", stream: "all" },
  { name: "`httpx-sse` (Python)", pkg: ["py", "httpx-sse"], transport: "SSE", file: "httpx_sse_client.py", stream: "all" },
  { name: "`ws` (npm)", pkg: ["npm", "ws"], transport: "WebSocket", file: "ws.mjs", stream: "all" },
  { name: "`websockets` (Python)", pkg: ["py", "websockets"], transport: "WebSocket", file: "websockets_client.py", stream: "all" },
  { name: "Node `fetch` + line reader", pkg: ["node"], transport: "NDJSON", file: "fetch_ndjson.mjs", stream: "all" },
  { name: "`httpx` streaming (Python)", pkg: ["py", "httpx"], transport: "NDJSON", file: "httpx_ndjson.py", stream: "all" },
  { name: "RESTHeart conventions over `ws`", pkg: ["npm", "ws"], transport: "WebSocket, `avars`, `{\"_data\"}` ids", file: "restheart_ws.mjs", stream: "tenant" },
];

const STREAMS = {
  all: {},
  // RESTHeart's `$var`, bound by ?avars= (every change of the collection passes).
  tenant: { pipeline: [{ $match: { "ns.coll": { $var: "coll" } } }] },
};

const write = process.argv.includes("--write");
// COMPAT_ONLY=eventsource,ws: run only the clients whose file starts with one of these (the
// doc is then neither checked nor written).
const ONLY = process.env.COMPAT_ONLY?.split(",");
const selected = (c) => c.file && (!ONLY || ONLY.some((o) => c.file.startsWith(o)));
const started = Date.now();

function version([kind, name]) {
  if (kind === "npm") return JSON.parse(fs.readFileSync(path.join(HERE, "node_modules", name, "package.json"), "utf8")).version;
  if (kind === "py") {
    const out = spawnText(PYTHON, ["-c", `import importlib.metadata as m; print(m.version(${JSON.stringify(name)}))`]);
    return out.trim();
  }
  if (kind === "node") return process.version.slice(1);
  return "Debian's";
}

function spawnText(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

/** One client process: its report lines, as they arrive. */
class Run {
  constructor(client, env) {
    this.client = client;
    this.lines = [];
    this.stderr = "";
    const script = path.join(HERE, "clients", client.file);
    const [cmd, args] = client.file.endsWith(".py") ? [PYTHON, ["-u", script]] : [process.execPath, [script]];
    this.child = spawn(cmd, args, { cwd: path.join(HERE, "clients"), env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let buffer = "";
    this.child.stdout.on("data", (chunk) => {
      buffer += chunk;
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (line) this.lines.push(JSON.parse(line));
      }
    });
    this.child.stderr.on("data", (chunk) => (this.stderr = (this.stderr + chunk).slice(-4000)));
    this.exited = new Promise((r) => this.child.once("exit", r));
  }
  find(key) {
    return this.lines.find((l) => key in l);
  }
  all(key) {
    return this.lines.filter((l) => key in l);
  }
  async wait(what, key, ms = WAIT) {
    return eventually(`${this.client.file}: ${what} (stderr: ${this.stderr.slice(-600)})`, ms, () => this.find(key)).catch(() => undefined);
  }
  kill() {
    if (this.child.exitCode === null) this.child.kill("SIGKILL");
  }
}

/** Canonical JSON (sorted keys), to compare states. */
function canon(value) {
  if (Array.isArray(value)) return `[${value.map(canon).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canon(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

/** The collection keyed by `_id`, minus the end marker. */
async function collection(mongo, db) {
  const docs = await mongo.find(db, "docs");
  return Object.fromEntries(docs.filter((d) => d._id !== "~end").map((d) => [d._id, d]));
}

/** A seeded random number generator, so a failing run can be replayed (COMPAT_SEED). */
function random(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

/** Random single-document writes on ids d0..d24: each is exactly one change. */
async function writeRandom(mongo, db, count, rand, present) {
  for (let i = 0; i < count; i++) {
    const id = `d${Math.floor(rand() * 25)}`;
    const n = Math.floor(rand() * 1000);
    if (!present.has(id)) {
      await mongo.insert(db, "docs", [{ _id: id, n, name: `Zoë ${n}`, nested: { a: { b: n }, c: "x" } }]);
      present.add(id);
      continue;
    }
    const op = rand();
    if (op < 0.35) await mongo.update(db, "docs", { _id: id }, { $set: { n, "nested.a.b": n + 1 } });
    else if (op < 0.5) await mongo.update(db, "docs", { _id: id }, { $unset: { name: "" }, $set: { n } });
    else if (op < 0.7) await mongo.update(db, "docs", { _id: id }, { _id: id, n, name: `réplique ${n}`, nested: { c: "y" } });
    else {
      await mongo.delete(db, "docs", { _id: id });
      present.delete(id);
    }
    if (i % 10 === 0) await new Promise((r) => setTimeout(r, 10));
  }
}

async function seed(mongo, db, present) {
  const docs = Array.from({ length: 15 }, (_, i) => ({ _id: `d${i}`, n: i, name: `Zoë ${i}`, nested: { a: { b: i }, c: "x" } }));
  await mongo.insert(db, "docs", docs);
  for (const d of docs) present.add(d._id);
}

function envFor(sg, db, client, extra = {}) {
  return {
    SG_URL: sg.origin,
    SG_PATH: `/${db}/docs/_streams/${client.stream}`,
    SG_AVARS: JSON.stringify({ coll: "docs" }),
    ...extra,
  };
}

/** Main scenario: initial state, resume across a kill -9, exactly once, terminal `cancel`. */
async function mainScenario(mongod, rand) {
  const db = "compat";
  const sg = await Streamgate.start(mongod, { streams: [], retryMs: 2000 });
  for (const [name, definition] of Object.entries(STREAMS)) {
    const r = await fetch(sg.url(`/_admin/streams/${db}/docs/${name}`), { method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(definition) });
    if (!r.ok) throw new Error(`PUT stream ${name}: ${r.status} ${await r.text()}`);
  }
  const present = new Set();
  await seed(mongod.client, db, present);
  const runs = CLIENTS.filter(selected).map((c) => new Run(c, envFor(sg, db, c)));
  await Promise.all(runs.map((r) => r.wait("initial state", "ready")));
  await writeRandom(mongod.client, db, WRITES / 2, rand, present);
  await sg.kill9();
  await writeRandom(mongod.client, db, WRITES / 4, rand, present);
  await sg.launch();
  await writeRandom(mongod.client, db, WRITES / 4, rand, present);
  await mongod.client.insert(db, "docs", [{ _id: "~end" }]);
  await Promise.all(runs.map((r) => r.wait("the end marker", "final")));
  const want = canon(await collection(mongod.client, db));
  for (const name of Object.keys(STREAMS)) await fetch(sg.url(`/_admin/streams/${db}/docs/${name}`), { method: "DELETE" });
  await Promise.all(runs.map((r) => r.wait("cancel after the stream was deleted", "terminal", 15_000)));
  const results = new Map();
  for (const r of runs) {
    const final = r.find("final");
    const terminal = r.find("terminal");
    const same = final && canon(final.final) === want;
    const once = final && final.changes === WRITES + 1 && final.ordered;
    results.set(r.client.file, {
      initial: r.find("ready") ? (same ? "yes" : "no: state differs") : "no: never ready",
      resume: !final ? "no: never reached the end" : !same ? "no: state differs from the collection" : once ? "yes" : `no: ${final.changes} changes for ${WRITES + 1} writes${final.ordered ? "" : ", out of order"}`,
      terminal: terminal?.terminal === "cancel" ? "`cancel`" : `no (${terminal?.terminal ?? "nothing"})`,
      stderr: r.stderr,
    });
    r.kill();
  }
  await sg.stop();
  return results;
}

/** Auth scenario: tokens that expire under the writer; each client must come back. */
async function authScenario(mongod, rand) {
  const db = "compat_auth";
  const sg = new Streamgate(mongod, [{ db, coll: "docs", name: "all" }], true, 500, await freePort());
  // The RESTHeart client's stream, with its `$var` (the harness's config has plain streams).
  fs.appendFileSync(sg.config, `\n[[streams]]\ndb = "${db}"\ncoll = "docs"\nname = "tenant"\npipeline = [{ "$match" = { "ns.coll" = { "$var" = "coll" } } }]\n`);
  await sg.launch();
  const present = new Set();
  await seed(mongod.client, db, present);
  const runs = CLIENTS.filter(selected).map((c) => new Run(c, envFor(sg, db, c, { SG_SECRET: SECRET, SG_TOKEN_SECS: String(TOKEN_SECS) })));
  await Promise.all(runs.map((r) => r.wait("initial state", "ready", 20_000)));
  // Until every client's token expired at least once (or 20 s), then a little more.
  const revokedAll = () => runs.every((r) => !r.find("ready") || r.find("refused") || r.all("terminal").some((t) => t.terminal === "auth_revoked"));
  const deadline = Date.now() + 20_000;
  while (!revokedAll() && Date.now() < deadline) await writeRandom(mongod.client, db, 10, rand, present);
  await writeRandom(mongod.client, db, 20, rand, present);
  await mongod.client.insert(db, "docs", [{ _id: "~end" }]);
  await Promise.all(runs.map((r) => (r.find("ready") ? r.wait("the end marker", "final") : undefined)));
  const want = canon(await collection(mongod.client, db));
  const results = new Map();
  for (const r of runs) {
    const final = r.find("final");
    const revoked = r.all("terminal").some((t) => t.terminal === "auth_revoked");
    const refused = r.find("refused");
    let cell;
    if (refused) cell = /Firebase emulator/.test(refused.refused) ? "no: sends `Bearer owner` (401 names it)" : `no: refused (${refused.refused.slice(0, 80)})`;
    else if (!final) cell = "no: never reached the end";
    else if (canon(final.final) !== want) cell = "no: state differs";
    else if (!revoked) cell = "no `auth_revoked` seen";
    else cell = r.client.view && r.client.file.startsWith("pyrebase") ? "yes: new stream, new `put`" : "yes";
    results.set(r.client.file, { token: cell, stderr: r.stderr, lines: r.lines });
    r.kill();
  }
  await sg.stop();
  return results;
}

function cell(text) {
  return text.replaceAll("|", "\\|");
}

function matrix(main, auth, versions) {
  const rows = [
    "| client | version | transport | initial state | resume across restart | token refresh | terminal event |",
    "|---|---|---|---|---|---|---|",
  ];
  for (const c of CLIENTS) {
    if (c.browser) {
      // Driven by tests/it (scripts/test's browser stage), not by this suite.
      rows.push(`| ${c.name} | ${versions.get(c)} | ${c.transport} | yes (\`browser_eventsource_renders_the_initial_put_and_a_later_patch\`) | yes (\`browser_eventsource_resumes_across_streamgate_restart\`) | not tested (no headers: \`?access_token=\`) | not tested |`);
      continue;
    }
    const m = main.get(c.file);
    const a = auth.get(c.file);
    if (!m || !a) continue; // not selected (COMPAT_ONLY)
    rows.push(`| ${c.name} | ${versions.get(c)} | ${c.transport} | ${cell(m.initial)} | ${cell(m.resume)} | ${cell(a.token)} | ${cell(m.terminal)} |`);
  }
  return rows.join("\n");
}

const BEGIN = "<!-- matrix: generated by tests/compat/run.mjs; `tests/compat/run --write` rewrites it -->";
const END_MARK = "<!-- end of matrix -->";

const mongod = await MongoD.start();
let failed = false;
try {
  const seedValue = Number(process.env.COMPAT_SEED || Date.now() % 100000);
  const [main, auth] = await Promise.all([mainScenario(mongod, random(seedValue)), authScenario(mongod, random(seedValue + 1))]);
  const versions = new Map(CLIENTS.map((c) => [c, version(c.pkg)]));
  const table = matrix(main, auth, versions);
  console.log(table);
  // Every cell must be what the matrix promises: "yes…", a Firebase event name, or the one
  // documented "no" (firebase-admin's emulator credential).
  let passed = 0;
  let failures = 0;
  for (const c of CLIENTS.filter(selected)) {
    const m = main.get(c.file);
    const a = auth.get(c.file);
    const expectedToken = c.token === "emulator" ? /^no: sends `Bearer owner`/ : /^yes/;
    const bad = [
      m.initial !== "yes" && `initial state: ${m.initial}`,
      m.resume !== "yes" && `resume: ${m.resume}`,
      m.terminal !== "`cancel`" && `terminal: ${m.terminal}`,
      !expectedToken.test(a.token) && `token refresh: ${a.token}`,
    ].filter(Boolean);
    if (!bad.length) passed++;
    else {
      failed = true;
      failures++;
      console.error(`FAIL ${c.name} (${c.file}): ${bad.join("; ")}\n  main stderr: ${m.stderr.slice(-800)}\n  auth stderr: ${a.stderr.slice(-800)}\n  auth reports: ${JSON.stringify(a.lines).slice(-800)}`);
    }
  }
  const doc = fs.readFileSync(DOC, "utf8");
  const at = doc.indexOf(BEGIN);
  const end = doc.indexOf(END_MARK);
  if (at < 0 || end < at) throw new Error(`${DOC} has no matrix markers`);
  const rendered = `${doc.slice(0, at + BEGIN.length)}\n${table}\n${doc.slice(end)}`;
  if (ONLY) {
    // A partial run checks its clients only.
  } else if (write) {
    fs.writeFileSync(DOC, rendered);
  } else if (rendered !== doc && !failed) {
    failed = true;
    console.error(`docs/compatibility.md's matrix differs from what this run observed: run tests/compat/run --write (seed ${seedValue})`);
  }
  console.log(`compat: ${((Date.now() - started) / 1000).toFixed(1)} s, seed ${seedValue} (COMPAT_SEED replays the writer)`);
  console.log(`compat: ${passed} passed, ${failures} failed`);
} finally {
  await mongod.stop();
}
process.exit(failed ? 1 : 0);

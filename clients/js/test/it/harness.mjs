// Integration harness: a real single-node mongod replica set and a real Streamgate binary, both
// on free loopback ports in a temp dir, killed (and the dir removed) when the test file ends.
//
// Binaries: $MONGOD (else <repo>/.cache/mongod/bin/mongod) and $STREAMGATE_BIN (else
// $CARGO_TARGET_DIR or <repo>/target, then /debug/streamgate; build it with `cargo build --bin
// streamgate`).
import { spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before } from "node:test";
import { Mongo } from "./mongo.mjs";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
export const MONGOD = process.env.MONGOD || path.join(REPO, ".cache/mongod/bin/mongod");
export const STREAMGATE =
  process.env.STREAMGATE_BIN || path.join(process.env.CARGO_TARGET_DIR || path.join(REPO, "target"), "debug/streamgate");

/** HS256 secret of servers started with `auth: true`. */
export const SECRET = "js-client-test-secret-0123456789-abcdef";
export const AUDIENCE = "streamgate";

const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** Polls `check` every 50 ms until it returns truthy; fails after `timeoutMs`. */
export async function eventually(what, timeoutMs, check) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A small deterministic PRNG (mulberry32). */
export function prng(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** JSON with object keys sorted, so field order does not matter. */
export function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object") return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  return JSON.stringify(value);
}

/** A free loopback port (bound, then released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A unique database name for one test. */
export function uniqueDb(prefix) {
  return `${prefix}_${process.pid}_${Date.now().toString(36)}_${Math.floor(Math.random() * 1e6)}`;
}

/**
 * The reason to skip when a prerequisite is missing, else `undefined`. Under `scripts/test`
 * (`STREAMGATE_JS_STRICT=1`) a missing prerequisite is an error instead: a full run never
 * passes by skipping.
 */
export function prerequisite(reason) {
  if (reason && process.env.STREAMGATE_JS_STRICT === "1") throw new Error(`STREAMGATE_JS_STRICT: ${reason}`);
  return reason;
}

/** Whether both binaries exist (otherwise the file's tests skip with this reason). */
export function missingBinaries() {
  const missing = [MONGOD, STREAMGATE].filter((p) => !fs.existsSync(p));
  return prerequisite(missing.length ? `missing ${missing.join(", ")} (set MONGOD / STREAMGATE_BIN, or cargo build --bin streamgate)` : undefined);
}

/** A running mongod replica set (`rs0`, one node). */
export class MongoD {
  static async start() {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "streamgate-js-"));
    const port = await freePort();
    const child = spawn(
      MONGOD,
      [
        "--replSet", "rs0", "--bind_ip", "127.0.0.1", "--port", String(port), "--dbpath", dir,
        "--logpath", path.join(dir, "mongod.log"), "--oplogSize", "128", "--wiredTigerCacheSizeGB", "0.25",
        "--setParameter", "diagnosticDataCollectionEnabled=false",
        "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=20MB)",
      ],
      { stdio: "ignore" },
    );
    children.add(child);
    const mongod = new MongoD(dir, port, child);
    await eventually("mongod accepts connections", 60_000, () => canConnect(port));
    const init = spawnSync(
      STREAMGATE,
      ["init-replset", "--uri", `mongodb://127.0.0.1:${port}/?directConnection=true`, "--replset", "rs0", "--host", `127.0.0.1:${port}`],
      { encoding: "utf8", timeout: 90_000 },
    );
    if (init.status !== 0) throw new Error(`init-replset failed: ${init.stderr}`);
    mongod.client = await Mongo.connect(port);
    return mongod;
  }

  constructor(dir, port, child) {
    this.dir = dir;
    this.port = port;
    this.child = child;
  }

  get uri() {
    return `mongodb://127.0.0.1:${this.port}/?replicaSet=rs0`;
  }

  async stop() {
    this.client?.close();
    this.child.kill("SIGKILL");
    await new Promise((r) => (this.child.exitCode !== null ? r() : this.child.once("exit", r)));
    children.delete(this.child);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** A TOML string. */
const q = (s) => JSON.stringify(s);

/** A JSON value as a TOML inline value (keys quoted, so `$match` and dotted paths stay keys). */
function tomlValue(value) {
  if (Array.isArray(value)) return `[${value.map(tomlValue).join(", ")}]`;
  if (value !== null && typeof value === "object") return `{ ${Object.entries(value).map(([k, v]) => `${q(k)} = ${tomlValue(v)}`).join(", ")} }`;
  if (typeof value === "string" || typeof value === "number" || typeof value === "boolean") return JSON.stringify(value);
  throw new Error(`no TOML for ${value}`);
}

/**
 * A Streamgate process. `streams`: `[{db, coll, name, ...definition}]`, the definition's other
 * members (`pipeline`, `fullDocument`, `membership`, …, PROTOCOL.md §1) written as they are;
 * `auth`: HS256 tokens (`token()`) that may subscribe to every stream of those databases.
 */
export class Streamgate {
  static async start(mongod, { streams, auth = false, retryMs = 300, port } = {}) {
    const sg = new Streamgate(mongod, streams, auth, retryMs, port ?? (await freePort()));
    await sg.launch();
    return sg;
  }

  constructor(mongod, streams, auth, retryMs, port) {
    this.mongod = mongod;
    this.port = port;
    this.origin = `http://127.0.0.1:${port}`;
    this.config = path.join(mongod.dir, `streamgate-${port}.toml`);
    const lines = [
      `listen = ${q(`127.0.0.1:${port}`)}`,
      `mongo_uri = ${q(mongod.uri)}`,
      `sse_retry_ms = ${retryMs}`,
      "worker_linger_ms = 300",
      "shutdown_grace_secs = 2",
    ];
    for (const { db, coll, name, ...definition } of streams) {
      lines.push("", "[[streams]]", `db = ${q(db)}`, `coll = ${q(coll)}`, `name = ${q(name)}`);
      for (const [key, value] of Object.entries(definition)) lines.push(`${key} = ${tomlValue(value)}`);
    }
    if (auth) {
      const dbs = [...new Set(streams.map((s) => s.db))];
      lines.push("", "[auth]", "enabled = true", "[auth.jwt]", `hs256_secret = ${q(SECRET)}`, `audience = ${q(AUDIENCE)}`);
      lines.push("[[auth.rules]]", 'roles = ["reader"]', `streams = [${dbs.map((d) => q(`/${d}/*/_streams/*`)).join(", ")}]`);
    }
    fs.writeFileSync(this.config, lines.join("\n") + "\n");
    this.log = path.join(mongod.dir, `streamgate-${port}.log`);
  }

  /** Starts the process and waits until it is ready. */
  async launch() {
    const out = fs.openSync(this.log, "a");
    this.child = spawn(STREAMGATE, ["--config", this.config], { stdio: ["ignore", out, out], env: { ...process.env, RUST_LOG: "warn" } });
    fs.closeSync(out);
    children.add(this.child);
    const exited = new Promise((r) => this.child.once("exit", r));
    this.exited = exited;
    await eventually(`streamgate ready on ${this.origin} (log: ${this.log})`, 60_000, async () => {
      if (this.child.exitCode !== null) throw new Error(`streamgate exited: ${fs.readFileSync(this.log, "utf8").slice(-2000)}`);
      const response = await fetch(`${this.origin}/health/ready`).catch(() => undefined);
      return response?.status === 200;
    });
  }

  /** SIGKILL: no goodbye to anyone. */
  async kill9() {
    this.child.kill("SIGKILL");
    await this.exited;
    children.delete(this.child);
  }

  /** kill -9, then start again on the same port. */
  async restart() {
    await this.kill9();
    await this.launch();
  }

  async stop() {
    if (this.child.exitCode === null) {
      this.child.kill("SIGTERM");
      await this.exited;
    }
    children.delete(this.child);
  }

  url(p) {
    return `${this.origin}${p}`;
  }
}

/** An HS256 JWT for role `reader`, expiring `expiresInSecs` from now. */
export function token(expiresInSecs, sub = "js-client") {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + expiresInSecs;
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, roles: ["reader"], aud: AUDIENCE, exp })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/**
 * Whether the server has a feature, asked of the server itself (the contract's features land
 * branch by branch): `snapshot` (PROTOCOL.md §6), `view` (§7), `multi` (§8), `multiSnapshot`
 * (§6 through §8). Returns `undefined` when it does, else the reason to skip.
 */
export async function probe(sg, feature, streamPath) {
  // Reads an SSE answer until one of the feature's own events shows up, for at most 3 s.
  const read = async (url) => {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), 3000);
    let status = 0;
    let text = "";
    try {
      const response = await fetch(url, { headers: { accept: "text/event-stream" }, signal: controller.signal });
      status = response.status;
      if (status !== 200) return { status, text };
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      while (!/event: (snapshot|ready|put)\b|"event":"(snapshot|ready)"/.test(text)) {
        const { done, value } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
    } catch {
      // Timed out: what came so far is the answer.
    } finally {
      clearTimeout(timer);
      controller.abort();
    }
    return { status, text };
  };
  switch (feature) {
    case "snapshot": {
      const r = await read(sg.url(`${streamPath}?snapshot=true`));
      return /event: (snapshot|ready)/.test(r.text) ? undefined : "this Streamgate does not answer ?snapshot=true with snapshot/ready events yet (PROTOCOL.md §6)";
    }
    case "view": {
      const r = await read(sg.url(`${streamPath}.json`));
      return /event: put/.test(r.text) ? undefined : `this Streamgate has no document view yet (GET ${streamPath}.json: ${r.status}; PROTOCOL.md §7)`;
    }
    case "multi": {
      const r = await read(sg.url(`/_streams?streams=${streamPath}`));
      return r.status === 200 ? undefined : `this Streamgate has no /_streams yet (status ${r.status}; PROTOCOL.md §8)`;
    }
    case "multiSnapshot": {
      const r = await read(sg.url(`/_streams?streams=${streamPath}&snapshot=true`));
      return r.status === 200 && /"event":"(snapshot|ready)"|event: (snapshot|ready)/.test(r.text)
        ? undefined
        : `this Streamgate does not take snapshot=true on /_streams (status ${r.status}; PROTOCOL.md §6 + §8)`;
    }
    default:
      throw new Error(`unknown feature ${feature}`);
  }
}

/**
 * One mongod for a test file: started before its tests and stopped after them (none when
 * `skip` says the binaries are missing). The server is `.mongod` of the returned object once
 * the tests run.
 */
export function mongodForFile(skip) {
  const held = { mongod: undefined };
  before(async () => {
    if (!skip) held.mongod = await MongoD.start();
  });
  after(async () => {
    await held.mongod?.stop();
  });
  return held;
}

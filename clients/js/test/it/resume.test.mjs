// Against a real Streamgate and mongod: kill -9 the server mid-stream, start it again, and
// every insert arrives exactly once, in order, over SSE and over NDJSON.
import { test } from "node:test";
import assert from "node:assert/strict";
import { subscribe } from "../../dist/index.js";
import { Streamgate, eventually, missingBinaries, probe, uniqueDb, mongodForFile } from "./harness.mjs";

const skip = missingBinaries();
const shared = mongodForFile(skip);

/** Inserts `{seq}` for seq in [from, to) at about `perSecond`. */
async function insertPaced(db, coll, from, to, perSecond) {
  const start = Date.now();
  for (let seq = from; seq < to; seq++) {
    await shared.mongod.client.insert(db, coll, [{ seq }]);
    const due = start + ((seq - from + 1) * 1000) / perSecond;
    const wait = due - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}

test("kill -9 mid-stream and restart: no loss, no duplicate (SSE and NDJSON)", { skip, timeout: 120_000 }, async () => {
  const db = uniqueDb("js_resume");
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "c", name: "s" }], retryMs: 200 });
  const url = sg.url(`/${db}/c/_streams/s`);
  const clients = ["sse", "ndjson"].map((transport) => {
    const seen = [];
    const states = [];
    const sub = subscribe(url, { transport, retryMs: 200, maxRetryMs: 1000 });
    sub.on("change", (m) => seen.push(m.data.fullDocument.seq));
    sub.on("state", (s) => states.push(s.state));
    return { transport, sub, seen, states };
  });
  await eventually("both clients connected", 10_000, () => clients.every((c) => c.sub.state === "open"));

  const N = 600;
  const writer = insertPaced(db, "c", 0, N, 100);
  await eventually("200 events delivered before the kill", 30_000, () => clients.every((c) => c.seen.length >= 200));
  await sg.kill9();
  // Writes go on while the server is down; the restart resumes from each client's last id.
  await eventually("the clients noticed", 10_000, () => clients.every((c) => c.sub.state !== "open"));
  await sg.launch();
  await writer;
  for (const c of clients) {
    await eventually(`${c.transport}: all ${N} events`, 60_000, () => c.seen.length >= N);
    assert.deepEqual(c.seen, Array.from({ length: N }, (_, i) => i), `${c.transport}: every event exactly once, in order`);
    assert.ok(c.states.filter((s) => s === "open").length >= 2, `${c.transport} reconnected: ${c.states}`);
    c.sub.close();
  }
  await sg.stop();
});

test("/_streams: kill -9 and restart resume every stream from the composite id, exactly once", { skip, timeout: 120_000 }, async (t) => {
  const db = uniqueDb("js_resume_multi");
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "a", name: "s" }, { db, coll: "b", name: "s" }], retryMs: 200 });
  const A = `/${db}/a/_streams/s`;
  const B = `/${db}/b/_streams/s`;
  const missing = await probe(sg, "multi", A);
  if (missing) {
    t.skip(missing);
    console.log(`# SKIPPED: ${missing}`);
    return sg.stop();
  }
  const seen = { [A]: [], [B]: [] };
  const sub = subscribe(sg.url(`/_streams?streams=${A},${B}`), { retryMs: 200, maxRetryMs: 1000 });
  sub.on("change", (m) => seen[m.stream].push(m.data.fullDocument.seq));
  await eventually("connected", 10_000, () => sub.state === "open");
  const N = 300;
  const writers = Promise.all([insertPaced(db, "a", 0, N, 50), insertPaced(db, "b", 0, N, 50)]);
  await eventually("100 events of each before the kill", 30_000, () => seen[A].length >= 100 && seen[B].length >= 100);
  await sg.kill9();
  await eventually("the client noticed", 10_000, () => sub.state !== "open");
  await sg.launch();
  await writers;
  await eventually(`all ${N} events of both streams`, 60_000, () => seen[A].length >= N && seen[B].length >= N);
  const all = Array.from({ length: N }, (_, i) => i);
  assert.deepEqual(seen[A], all);
  assert.deepEqual(seen[B], all);
  sub.close();
  await sg.stop();
});

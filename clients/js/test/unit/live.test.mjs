// Folding events into documents (applyChange / applyView) and liveCollection on synthetic
// streams written to the contract (PROTOCOL.md §6, §7, §8).
import { test } from "node:test";
import assert from "node:assert/strict";
import { applyChange, applyView, idKey, liveCollection } from "../../dist/index.js";
import { fakeServer } from "./fake.mjs";

test("idKey: the text the document view uses", () => {
  assert.equal(idKey("a/b"), "a/b");
  assert.equal(idKey({ $oid: "65A1B2C3D4E5F60718293A4B" }), "65a1b2c3d4e5f60718293a4b");
  assert.equal(idKey(7), "7");
  assert.equal(idKey({ $numberLong: "9007199254740993" }), "9007199254740993");
  assert.equal(idKey({ x: 1 }), '{"x":1}');
});

test("applyChange: insert, update (full and delta), replace, delete, drop", () => {
  const docs = new Map();
  applyChange(docs, { operationType: "insert", documentKey: { _id: 1 }, fullDocument: { _id: 1, a: { b: 1 }, arr: [1, 2, 3], gone: true } });
  applyChange(docs, {
    operationType: "update",
    documentKey: { _id: 1 },
    updateDescription: { updatedFields: { "a.b": 2, "arr.1": 9, n: 5 }, removedFields: ["gone"], truncatedArrays: [{ field: "arr", newSize: 2 }] },
  });
  assert.deepEqual(docs.get("1"), { _id: 1, a: { b: 2 }, arr: [1, 9], n: 5 });
  applyChange(docs, { operationType: "update", documentKey: { _id: 1 }, fullDocument: { _id: 1, z: 1 }, updateDescription: {} });
  assert.deepEqual(docs.get("1"), { _id: 1, z: 1 });
  applyChange(docs, { operationType: "replace", documentKey: { _id: 1 }, fullDocument: { _id: 1, r: 1 } });
  applyChange(docs, { operationType: "insert", documentKey: { _id: 2 }, fullDocument: { _id: 2 } });
  applyChange(docs, { operationType: "delete", documentKey: { _id: 1 } });
  assert.deepEqual([...docs.keys()], ["2"]);
  assert.equal(applyChange(docs, { operationType: "drop" }), true);
  assert.equal(docs.size, 0);
});

test("applyChange: membership removals and entries (PROTOCOL.md §10)", () => {
  const docs = new Map();
  applyChange(docs, { operationType: "insert", documentKey: { _id: 1 }, fullDocument: { _id: 1, t: "A" } });
  // Document 1 moved to another tenant: removed, although the change is an update.
  assert.equal(
    applyChange(docs, { operationType: "update", documentKey: { _id: 1 }, fullDocument: { _id: 1, t: "B" }, updateDescription: { updatedFields: { t: "B" } }, streamgate: { membership: "left" } }),
    true,
  );
  assert.equal(docs.size, 0);
  // Document 2 moved in: held whole, not patched from a delta.
  applyChange(docs, { operationType: "update", documentKey: { _id: 2 }, fullDocument: { _id: 2, t: "A", n: 1 }, updateDescription: { updatedFields: { t: "A" } }, streamgate: { membership: "entered" } });
  assert.deepEqual(Object.fromEntries(docs), { 2: { _id: 2, t: "A", n: 1 } });
  // A removal of a document not held changes nothing.
  assert.equal(applyChange(docs, { operationType: "replace", documentKey: { _id: 9 }, fullDocument: { _id: 9 }, streamgate: { membership: "left" } }), false);
});

test("applyView: the example of PROTOCOL.md §7", () => {
  const docs = new Map();
  applyView(docs, "put", { path: "/", data: { a: { _id: "a", score: 1, f: { g: 1 }, removedField: 1 }, b: { _id: "b" } } });
  applyView(docs, "patch", { path: "/a", data: { score: 300, "f/g": 3, removedField: null } });
  applyView(docs, "put", { path: "/b", data: null });
  applyView(docs, "put", { path: "/c/d", data: { _id: "c/d" } });
  assert.deepEqual(Object.fromEntries(docs), { a: { _id: "a", score: 300, f: { g: 3 } }, "c/d": { _id: "c/d" } });
});

const frame = (event, data, id) => `${id !== undefined ? `id: ${id}\n` : ""}event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
const ins = (id, extra = {}) => ({ operationType: "insert", documentKey: { _id: id }, fullDocument: { _id: id, ...extra } });
const waitFor = async (predicate, ms = 3000) => {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 5));
  }
};

test("liveCollection: snapshot builds aside, ready swaps, changes apply, history_lost rebuilds", async () => {
  const fake = fakeServer();
  const live = liveCollection("http://sg.test/db/c/_streams/s", { fetch: fake.fetch, retryMs: 1 });
  const emitted = [];
  live.on("data", (docs) => emitted.push([...docs.keys()].join(",")));
  const resets = [];
  live.on("reset", (r) => resets.push(r));
  const c1 = (await fake.next()).open();
  assert.equal(c1.url.searchParams.get("snapshot"), "true");
  c1.push(frame("snapshot", ins(1), "S1") + frame("snapshot", ins(2), "S2"));
  await waitFor(() => live.subscription.lastEventId === "S2");
  c1.fail(); // dropped mid-snapshot: resumes it
  const c2 = (await fake.next()).open();
  assert.equal(c2.headers["last-event-id"], "S2");
  c2.push(frame("snapshot", ins(3), "S3") + frame("ready", { count: 3 }, "R"));
  await live.ready;
  assert.deepEqual(emitted, ["1,2,3"]);
  c2.push(frame("change", ins(4), "C4") + frame("change", { operationType: "delete", documentKey: { _id: 1 } }, "C5"));
  await waitFor(() => emitted.length === 3);
  assert.deepEqual(emitted, ["1,2,3", "1,2,3,4", "2,3,4"]);
  // history_lost: told, then a fresh snapshot; the old state stays visible until `ready`.
  c2.push("id:\n" + frame("error", { code: "history_lost", message: "gone" }).slice(0));
  const c3 = (await fake.next()).open();
  assert.equal(c3.headers["last-event-id"], undefined);
  assert.equal(c3.url.searchParams.get("snapshot"), "true");
  c3.push(frame("snapshot", ins(7), "T1"));
  await waitFor(() => resets.length === 1);
  assert.deepEqual([...live.value.keys()], ["2", "3", "4"]);
  c3.push(frame("snapshot", ins(8), "T2") + frame("ready", { count: 2 }, "TR"));
  await waitFor(() => emitted.length === 4);
  assert.equal(emitted[3], "7,8");
  assert.deepEqual(resets, [{ reason: "history_lost", snapshot: true }]);
  live.close();
});

test("liveCollection: a server that ignores snapshot=true is reported, changes still apply", async () => {
  const fake = fakeServer();
  const live = liveCollection("http://sg.test/db/c/_streams/s", { fetch: fake.fetch });
  const incomplete = [];
  live.on("incomplete", (i) => incomplete.push(i));
  const c1 = (await fake.next()).open();
  c1.push(frame("change", ins(1), "C1"));
  await live.ready;
  assert.equal(incomplete.length, 1);
  assert.deepEqual([...live.value.keys()], ["1"]);
  live.close();
});

test("liveCollection view: the .json URL, the first put, patches, a history_lost restart", async () => {
  const fake = fakeServer();
  const live = liveCollection("http://sg.test/db/c/_streams/s", { fetch: fake.fetch, view: true, retryMs: 1 });
  const c1 = (await fake.next()).open();
  assert.equal(c1.url.pathname, "/db/c/_streams/s.json");
  assert.equal(c1.url.searchParams.get("snapshot"), null);
  c1.push(frame("put", { path: "/", data: { a: { _id: "a", n: 1 } } }, "P0") + "event: keep-alive\ndata: null\n\n");
  await live.ready;
  c1.push(frame("patch", { path: "/a", data: { n: 2 } }, "P1") + frame("put", { path: "/b", data: { _id: "b" } }, "P2"));
  await waitFor(() => live.value.size === 2 && live.value.get("a").n === 2);
  c1.push("id:\n" + frame("error", { code: "history_lost", message: "gone" }));
  const c2 = (await fake.next()).open();
  c2.push(frame("put", { path: "/", data: { z: { _id: "z" } } }, "Q0"));
  await waitFor(() => live.value.has("z"));
  assert.deepEqual([...live.value.keys()], ["z"]);
  live.close();
});

test("liveCollection of several streams: one /_streams connection, one map per stream", async () => {
  const fake = fakeServer();
  const A = "/db/c/_streams/a";
  const B = "/db/d/_streams/b";
  const live = liveCollection([`http://sg.test${A}`, `http://sg.test${B}`], { fetch: fake.fetch });
  const c1 = (await fake.next()).open();
  assert.equal(c1.url.pathname, "/_streams");
  assert.equal(c1.url.searchParams.get("streams"), `${A},${B}`);
  const env = (pos, stream, event, data) => frame(event, { stream, event, id: pos, data }, pos);
  c1.push(env("P1", A, "snapshot", ins(1)) + env("P2", A, "ready", { count: 1 }) + env("P3", B, "ready", { count: 0 }));
  await live.ready;
  c1.push(env("P4", B, "change", ins("x")));
  await waitFor(() => live.value.get(B).size === 1);
  assert.deepEqual([...live.value.get(A).keys()], ["1"]);
  assert.deepEqual([...live.value.get(B).keys()], ["x"]);
  live.close();
});

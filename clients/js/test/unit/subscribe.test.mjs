// subscribe(): resume, backoff, retry:, tokens and the terminal-event policy, on scripted
// connections (test/unit/fake.mjs).
import { test } from "node:test";
import assert from "node:assert/strict";
import { subscribe } from "../../dist/index.js";
import { fakeServer, recorder, change } from "./fake.mjs";

const URL_ = "http://sg.test/db/c/_streams/s";
const seqs = (log) => log.of("message").filter((m) => m.event === "change").map((m) => m.data.fullDocument.seq);

test("reconnects after a cut with Last-Event-ID and never counts a half frame", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1, random: () => 0 });
  const log = recorder(sub);
  const first = (await fake.next()).open();
  assert.equal(first.headers.accept, "text/event-stream");
  assert.equal(first.headers["last-event-id"], undefined);
  first.push(change("A", 1) + change("B", 2) + 'id: C\nevent: change\ndata: {"operationType":"ins');
  await log.until(() => seqs(log).length === 2);
  first.fail();
  const second = (await fake.next()).open();
  assert.equal(second.headers["last-event-id"], "B");
  second.push(change("C", 3));
  await log.until(() => seqs(log).length === 3);
  assert.deepEqual(seqs(log), [1, 2, 3]);
  assert.equal(sub.lastEventId, "C");
  const states = log.of("state").map((s) => s.state);
  assert.deepEqual(states, ["open", "reconnecting", "connecting", "open"]);
  assert.equal(log.of("state")[3].resumedFrom, "B");
  sub.close();
  assert.equal((await sub.closed).reason, "closed");
  assert.equal(sub.state, "closed");
});

test("backoff doubles with jitter from the server's retry:, capped, and resets on progress", async () => {
  const fake = fakeServer();
  let r = 0;
  const randoms = [0, 0.999, 0, 0, 0];
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 5000, maxRetryMs: 80, random: () => randoms[r++ % randoms.length] });
  const log = recorder(sub);
  const c1 = (await fake.next()).open();
  c1.push("retry: 10\n\n");
  c1.end();
  (await fake.next()).status(503, { title: "busy" }); // attempt 1
  (await fake.next()).status(502); // attempt 2
  (await fake.next()).status(500); // attempt 3
  const c5 = (await fake.next()).open(); // after 4 failures
  c5.push(change("A", 1));
  await log.until(() => seqs(log).length === 1);
  c5.end();
  (await fake.next()).open();
  const delays = log.of("state").filter((s) => s.state === "reconnecting").map((s) => s.delayMs);
  // retry: 10 overrides retryMs; 10·2^n capped at 80, times [1, 1.5): 10, 20·1.4995, 40, 80 (cap),
  // then progress resets the exponent: 10.
  assert.deepEqual(delays, [10, 30, 40, 80, 10]);
  assert.deepEqual(log.of("failure").map((f) => f.status), [503, 502, 500]);
  sub.close();
});

test("Retry-After is a floor for 429/503", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1, random: () => 0 });
  const log = recorder(sub);
  (await fake.next()).status(429, { title: "too many" }, { "retry-after": "1" });
  await log.until(() => log.of("state").some((s) => s.state === "reconnecting"));
  assert.equal(log.of("state").find((s) => s.state === "reconnecting").delayMs, 1000);
  sub.close();
});

test("getToken: at every connect, and again with the reason on auth_revoked and on 401", async () => {
  const fake = fakeServer();
  const asked = [];
  let n = 0;
  const sub = subscribe(URL_, {
    fetch: fake.fetch,
    retryMs: 1,
    random: () => 0,
    getToken: async ({ reason }) => {
      asked.push(reason);
      return `t${++n}`;
    },
  });
  const log = recorder(sub);
  const c1 = (await fake.next()).open();
  assert.equal(c1.headers.authorization, "Bearer t1");
  c1.push(change("A", 1) + 'event: auth_revoked\ndata: {"code":"auth_revoked","message":"the access token expired"}\n\n');
  const c2 = await fake.next();
  assert.equal(c2.headers.authorization, "Bearer t2");
  assert.equal(c2.headers["last-event-id"], "A");
  c2.status(401);
  const c3 = (await fake.next()).open();
  assert.equal(c3.headers.authorization, "Bearer t3");
  assert.equal(c3.headers["last-event-id"], "A");
  c3.push(change("B", 2));
  await log.until(() => seqs(log).length === 2);
  assert.deepEqual(asked, ["connect", "auth_revoked", "unauthorized"]);
  // The first reconnect after auth_revoked is immediate.
  assert.equal(log.of("state").find((s) => s.state === "reconnecting").delayMs, 0);
  sub.close();
});

test("tokenParam sends the token in the query; avars, params and snapshot go there too", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, {
    fetch: fake.fetch,
    getToken: () => "tok",
    tokenParam: "access_token",
    avars: { tenant: "t1" },
    params: { rewind: 5 },
    snapshot: true,
  });
  const c = await fake.next();
  assert.equal(c.url.searchParams.get("access_token"), "tok");
  assert.equal(c.url.searchParams.get("avars"), '{"tenant":"t1"}');
  assert.equal(c.url.searchParams.get("rewind"), "5");
  assert.equal(c.url.searchParams.get("snapshot"), "true");
  assert.equal(c.headers.authorization, undefined);
  sub.close();
});

test("history_lost: the app is told, the position is dropped, the restart asks for a snapshot", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1, lastEventId: "OLD", snapshotOnHistoryLost: true });
  const log = recorder(sub);
  const c1 = (await fake.next()).open();
  assert.equal(c1.headers["last-event-id"], "OLD");
  assert.equal(c1.url.searchParams.get("snapshot"), null);
  c1.push('id:\nevent: error\ndata: {"code":"history_lost","message":"gone"}\n\n');
  const c2 = (await fake.next()).open();
  assert.equal(c2.headers["last-event-id"], undefined);
  assert.equal(c2.url.searchParams.get("snapshot"), "true");
  assert.deepEqual(log.of("reset"), [{ reason: "history_lost", snapshot: true }]);
  sub.close();
});

test("history_lost over NDJSON drops the position too", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, transport: "ndjson", retryMs: 1, lastEventId: "OLD" });
  const c1 = (await fake.next()).open("application/x-ndjson");
  assert.equal(c1.headers.accept, "application/x-ndjson");
  c1.push('{"event":"error","data":{"code":"history_lost","message":"gone"}}\n');
  const c2 = await fake.next();
  assert.equal(c2.headers["last-event-id"], undefined);
  sub.close();
});

test("slow_consumer resumes at once from the last id", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 10_000 });
  const log = recorder(sub);
  const c1 = (await fake.next()).open();
  c1.push(change("A", 1) + 'event: error\ndata: {"code":"slow_consumer","message":"stalled"}\n\n');
  const c2 = await fake.next(1000);
  assert.equal(c2.headers["last-event-id"], "A");
  assert.equal(log.of("state").find((s) => s.state === "reconnecting").delayMs, 0);
  sub.close();
});

test("cancel: reconnect once; a second cancel with no event between ends it", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1 });
  const log = recorder(sub);
  const CANCEL = 'event: cancel\ndata: {"code":"cancel","message":"stream deleted"}\n\n';
  const c1 = (await fake.next()).open();
  c1.push(change("A", 1) + CANCEL);
  const c2 = (await fake.next()).open();
  assert.equal(c2.headers["last-event-id"], "A");
  c2.push(change("B", 2) + CANCEL); // progress in between: allowed once more
  const c3 = (await fake.next()).open();
  c3.push(CANCEL);
  assert.equal((await sub.closed).reason, "cancel");
  assert.equal(fake.all.length, 3);
  assert.deepEqual(seqs(log), [1, 2]);
});

test("cancel then 404 (the stream is gone) ends it", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1 });
  const c1 = (await fake.next()).open();
  c1.push('event: cancel\ndata: {"code":"cancel","message":"stream deleted"}\n\n');
  (await fake.next()).status(404);
  const info = await sub.closed;
  assert.equal(info.reason, "cancel");
  assert.equal(info.failure.status, 404);
});

test("invalidate ends it; a 400 ends it; shutdown and a cut body reconnect", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1 });
  const c1 = (await fake.next()).open();
  c1.push('event: error\ndata: {"code":"shutdown","message":"bye"}\n\n');
  const c2 = (await fake.next()).open();
  c2.push('id: I\nevent: invalidate\ndata: {"operationType":"invalidate"}\n\n');
  assert.equal((await sub.closed).reason, "invalidate");

  const fake2 = fakeServer();
  const sub2 = subscribe(URL_, { fetch: fake2.fetch, lastEventId: "bad" });
  (await fake2.next()).status(400, { title: "Bad Request", detail: "malformed lastEventId" });
  const info = await sub2.closed;
  assert.equal(info.reason, "http");
  assert.equal(info.failure.message, "malformed lastEventId");
});

test("a 200 that is not an event stream ends it with a protocol failure", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch });
  (await fake.next()).open("text/html");
  assert.equal((await sub.closed).reason, "protocol");
});

test("no byte for idleTimeoutMs: reconnect", async () => {
  const fake = fakeServer();
  const sub = subscribe(URL_, { fetch: fake.fetch, retryMs: 1, idleTimeoutMs: 50 });
  const log = recorder(sub);
  const c1 = (await fake.next()).open();
  c1.push(change("A", 1));
  const c2 = await fake.next();
  assert.equal(c2.headers["last-event-id"], "A");
  assert.equal(log.of("failure")[0].kind, "idle");
  sub.close();
});

test("a listener that throws does not cost the stream its place", async () => {
  const fake = fakeServer();
  const thrown = [];
  const sub = subscribe(URL_, { fetch: fake.fetch, onListenerError: (e) => thrown.push(e.message) });
  sub.on("change", () => {
    throw new Error("app bug");
  });
  const log = recorder(sub);
  const c = (await fake.next()).open();
  c.push(change("A", 1) + change("B", 2));
  await log.until(() => seqs(log).length === 2 && thrown.length === 2);
  assert.deepEqual(thrown, ["app bug", "app bug"]);
  assert.equal(sub.lastEventId, "B");
  sub.close();
});

test("/_streams: envelopes unwrapped, composite position resumed, a stream's end handled alone", async () => {
  const fake = fakeServer();
  const A = "/db/c/_streams/a";
  const B = "/db/c/_streams/b";
  const sub = subscribe(`http://sg.test/_streams?streams=${A},${B}`, { fetch: fake.fetch, retryMs: 1 });
  const log = recorder(sub);
  const env = (pos, stream, event, data) => `id: ${pos}\nevent: ${event}\ndata: ${JSON.stringify({ stream, event, id: pos, data })}\n\n`;
  const c1 = (await fake.next()).open();
  assert.equal(c1.url.searchParams.get("streams"), `${A},${B}`);
  c1.push(
    `id: P0\nevent: info\ndata: {"streams":["${A}","${B}"],"position":"P0"}\n\n` +
      env("P1", A, "change", { operationType: "insert", fullDocument: { seq: 1 } }) +
      env("P2", B, "invalidate", { operationType: "invalidate" }) +
      env("P3", A, "change", { operationType: "insert", fullDocument: { seq: 2 } }),
  );
  await log.until(() => seqs(log).length === 2);
  const changes = log.of("message").filter((m) => m.event === "change");
  assert.deepEqual(changes.map((m) => [m.stream, m.id]), [[A, "P1"], [A, "P3"]]);
  assert.deepEqual(sub.streams, [A]);
  // history_lost of A: the app is told about A; the connection restarts (A from now).
  c1.push(env("P4", A, "error", { code: "history_lost", message: "gone" }));
  const c2 = await fake.next();
  assert.equal(c2.url.searchParams.get("streams"), A);
  assert.equal(c2.headers["last-event-id"], "P4");
  assert.deepEqual(log.of("reset"), [{ reason: "history_lost", snapshot: false, stream: A }]);
  sub.close();
});

test("/_streams: a cancelled stream that is then refused is dropped, the others go on", async () => {
  const fake = fakeServer();
  const A = "/db/c/_streams/a";
  const B = "/db/c/_streams/b";
  const sub = subscribe(`http://sg.test/_streams?streams=${A},${B}`, { fetch: fake.fetch, retryMs: 1, transport: "ndjson" });
  const log = recorder(sub);
  const c1 = (await fake.next()).open("application/x-ndjson");
  c1.push(JSON.stringify({ stream: B, event: "cancel", data: { code: "cancel", message: "deleted" } }) + "\n");
  (await fake.next()).status(404, { title: "Not Found", detail: `no stream is defined at ${B}` });
  const c3 = (await fake.next()).open("application/x-ndjson");
  assert.equal(c3.url.searchParams.get("streams"), A);
  assert.deepEqual(log.of("failure").map((f) => [f.status, f.stream, f.fatal]), [[404, B, false]]);
  sub.close();
});

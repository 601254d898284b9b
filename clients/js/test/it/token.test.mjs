// Against a real Streamgate with HS256 auth: tokens that expire every 3 s, for 30 s, under
// 100 inserts/s. The server ends the stream with `auth_revoked` at each expiry; the client asks
// getToken() again and resumes: every event exactly once.
import { test } from "node:test";
import assert from "node:assert/strict";
import { subscribe } from "../../dist/index.js";
import { Streamgate, eventually, missingBinaries, token, uniqueDb, mongodForFile } from "./harness.mjs";

const skip = missingBinaries();
const shared = mongodForFile(skip);

test("a token expiring every 3 s for 30 s under 100 inserts/s: every event exactly once", { skip, timeout: 120_000 }, async () => {
  const db = uniqueDb("js_token");
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "c", name: "s" }], auth: true });
  const url = sg.url(`/${db}/c/_streams/s`);
  // Without a token: refused, so the test really runs with auth on.
  assert.equal((await fetch(url, { headers: { accept: "text/event-stream" } })).status, 401);

  const reasons = [];
  const seen = [];
  const sub = subscribe(url, {
    retryMs: 200,
    maxRetryMs: 1000,
    getToken: ({ reason }) => {
      reasons.push(reason);
      return token(3);
    },
  });
  const revoked = [];
  sub.on("auth_revoked", () => revoked.push(Date.now()));
  sub.on("change", (m) => seen.push(m.data.fullDocument.seq));
  await eventually("connected", 10_000, () => sub.state === "open");

  const N = 3000;
  const start = Date.now();
  for (let seq = 0; seq < N; seq += 10) {
    await shared.mongod.client.insert(db, "c", Array.from({ length: 10 }, (_, i) => ({ seq: seq + i })));
    const wait = start + ((seq + 10) * 1000) / 100 - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
  await eventually(`all ${N} events`, 30_000, () => seen.length >= N);
  assert.equal(seen.length, N);
  assert.deepEqual(seen, Array.from({ length: N }, (_, i) => i), "every event exactly once, in order");
  // 30 s of 3 s tokens: about ten expiries, each answered by a fresh token.
  assert.ok(revoked.length >= 7, `auth_revoked ${revoked.length} times`);
  assert.ok(reasons.filter((r) => r === "auth_revoked").length >= 7, `getToken reasons: ${reasons}`);
  sub.close();
  await sg.stop();
});

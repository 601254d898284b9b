// liveCollection of filtered streams against a real Streamgate and mongod (PROTOCOL.md §10):
// a random writer moves documents into and out of `{"fullDocument.status": "open"}` (status
// flips, `$unset`, replaces, upserts, inserts, deletes, multi-document updates, transactions),
// and every client ends with exactly the documents its filter selects: over SSE with a snapshot
// (one client from before the writes, one joining during them), over the document view, and
// two streams over one /_streams connection. Only the membership markers make this hold: an
// update that takes a document out of the filter still carries it (`"membership":"left"`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { liveCollection } from "../../dist/index.js";
import { Streamgate, eventually, missingBinaries, probe, uniqueDb, mongodForFile, canonical, prng } from "./harness.mjs";

const skip = missingBinaries();
const shared = mongodForFile(skip);

/** Documents have integer ids in [0, IDS). */
const IDS = 40;

/** The documents `filter` selects, as `{id: canonical doc}`. */
async function selected(db, coll, filter) {
  const docs = await shared.mongod.client.find(db, coll, filter);
  return Object.fromEntries(docs.map((d) => [String(d._id), canonical(d)]));
}

function mapState(map) {
  return Object.fromEntries([...(map ?? [])].map(([k, d]) => [k, canonical(d)]));
}

/** Waits (bounded) until `read()` holds exactly what `filter` selects, then asserts it. */
async function assertSelects(label, read, db, coll, filter) {
  let expected;
  await eventually(`${label}: the live map equals ${db}.${coll} where ${JSON.stringify(filter)}`, 10_000, async () => {
    expected = await selected(db, coll, filter);
    return canonical(mapState(read())) === canonical(expected);
  }).catch(() => undefined);
  const held = mapState(read());
  const extra = Object.keys(held).filter((k) => !(k in expected));
  const missing = Object.keys(expected).filter((k) => !(k in held));
  assert.deepEqual(held, expected, `${label}: extra ${extra}, missing ${missing}`);
}

/**
 * `count` random writes moving documents in and out of `status: "open"`; each case says which
 * way a document can move. Sequential (one connection), so the last write of each document is
 * the one the final state shows.
 */
async function randomMoves(db, coll, count, seed) {
  const mongo = shared.mongod.client;
  const random = prng(seed);
  const pick = (n) => Math.floor(random() * n);
  const status = () => (random() < 0.5 ? "open" : "closed");
  for (let i = 0; i < count; i++) {
    const _id = pick(IDS);
    switch (pick(10)) {
      case 0:
      case 1:
      case 2:
        // In, out, or a plain update of a document that stays.
        await mongo.update(db, coll, { _id }, { $set: { status: status(), n: i } });
        break;
      case 3:
        // No move: fields of a document that stays where it is.
        await mongo.update(db, coll, { _id }, { $inc: { count: 1 }, $set: { "nested.at": i } });
        break;
      case 4:
        // Out by losing the field (a missing status is not "open").
        await mongo.update(db, coll, { _id }, { $unset: { status: "" } });
        break;
      case 5:
        // A whole replace, in or out.
        await mongo.update(db, coll, { _id }, { _id, status: status(), replaced: i });
        break;
      case 6:
        // Upsert: an insert when missing, else an update that may move it.
        await mongo.update(db, coll, { _id }, { $set: { status: status(), up: i }, $setOnInsert: { created: i } }, { upsert: true });
        break;
      case 7:
        // Insert (a write error when the id exists, ignored) or delete.
        if (random() < 0.5) await mongo.insert(db, coll, [{ _id, status: status(), n: i }]);
        else await mongo.delete(db, coll, { _id });
        break;
      case 8:
        // One update moving many documents at once.
        await mongo.update(db, coll, { status: status(), _id: { $lt: pick(IDS) } }, { $set: { status: status(), many: i } }, { multi: true });
        break;
      default:
        // A transaction: several documents move, one may be replaced, one deleted.
        await mongo.transaction(db, async (run) => {
          for (let k = 0; k < 3; k++) await run({ update: coll, updates: [{ q: { _id: pick(IDS) }, u: { $set: { status: status(), txn: i } } }] });
          if (random() < 0.5) await run({ update: coll, updates: [{ q: { _id: pick(IDS) }, u: { status: status(), txnReplaced: i }, upsert: true }] });
          else await run({ delete: coll, deletes: [{ q: { _id: pick(IDS) }, limit: 1 }] });
        });
    }
  }
}

/** Counts the membership markers a live collection's subscription delivered. */
function countMoves(live) {
  const moves = { left: 0, entered: 0 };
  live.subscription.on("change", (m) => {
    const membership = m.data?.streamgate?.membership;
    if (membership in moves) moves[membership]++;
  });
  return moves;
}

test("filtered streams: liveCollection ends with exactly the documents the filter selects (SSE snapshot, a client joining mid-writes, document view, /_streams)", { skip, timeout: 60_000 }, async (t) => {
  const db = uniqueDb("js_members");
  const mongo = shared.mongod.client;
  // Pre-images: without them the server decides by the post-image alone (§10) and cannot tell
  // a client that a document left.
  await mongo.command(db, { create: "c", changeStreamPreAndPostImages: { enabled: true } });
  const random = prng(7);
  await mongo.insert(db, "c", Array.from({ length: 30 }, (_, i) => ({ _id: i, status: random() < 0.5 ? "open" : "closed", n: i })));
  const filtered = (status) => ({ pipeline: [{ $match: { "fullDocument.status": status } }], fullDocument: "updateLookup" });
  const sg = await Streamgate.start(shared.mongod, {
    streams: [
      { db, coll: "c", name: "open", ...filtered("open") },
      { db, coll: "c", name: "closed", ...filtered("closed") },
    ],
  });
  const OPEN = `/${db}/c/_streams/open`;
  const CLOSED = `/${db}/c/_streams/closed`;
  for (const feature of ["snapshot", "view", "multiSnapshot"]) {
    const missing = await probe(sg, feature, OPEN);
    if (missing) {
      t.skip(missing);
      console.log(`# SKIPPED: ${missing}`);
      return sg.stop();
    }
  }

  const sse = liveCollection(sg.url(OPEN), { retryMs: 200 });
  const view = liveCollection(sg.url(OPEN), { view: true, retryMs: 200 });
  const multi = liveCollection([sg.url(OPEN), sg.url(CLOSED)], { retryMs: 200 });
  const moves = countMoves(sse);
  const incomplete = [];
  for (const live of [sse, view, multi]) live.on("incomplete", (i) => incomplete.push(i));
  await Promise.all([sse.ready, view.ready, multi.ready]);
  // Each starts with what the filter selects (the snapshot and the view's first put filter too).
  await assertSelects("SSE before writes", () => sse.value, db, "c", { status: "open" });

  await randomMoves(db, "c", 250, 1);
  // This one's snapshot is read while the writes go on.
  const late = liveCollection(sg.url(OPEN), { retryMs: 200 });
  late.on("incomplete", (i) => incomplete.push(i));
  await randomMoves(db, "c", 250, 2);
  await late.ready;

  await assertSelects("SSE snapshot + changes", () => sse.value, db, "c", { status: "open" });
  await assertSelects("SSE joined mid-writes", () => late.value, db, "c", { status: "open" });
  await assertSelects("document view (.json)", () => view.value, db, "c", { status: "open" });
  await assertSelects("/_streams, open", () => multi.value.get(OPEN), db, "c", { status: "open" });
  await assertSelects("/_streams, closed", () => multi.value.get(CLOSED), db, "c", { status: "closed" });
  assert.deepEqual(incomplete, []);
  // The writes did move documents both ways, and every move was decided with a pre-image.
  t.diagnostic(`membership markers on the first SSE client: ${JSON.stringify(moves)}`);
  assert.ok(moves.left > 20 && moves.entered > 20, `entries and removals: ${JSON.stringify(moves)}`);
  const metrics = await (await fetch(sg.url("/metrics"))).text();
  assert.match(metrics, /^streamgate_membership_without_pre_image_total 0$/m);

  for (const live of [sse, late, view, multi]) live.close();
  await sg.stop();
});

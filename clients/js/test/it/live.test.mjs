// liveCollection against a real Streamgate and mongod: under random writes the map equals the
// collection at the end (snapshot + changes, the document view, several streams on one
// connection); after history_lost the state is rebuilt and equal to the collection.
//
// These need server features of PROTOCOL.md §6-§8; each test asks the server first and is
// skipped, with the reason printed, when it does not have them yet.
import { test } from "node:test";
import assert from "node:assert/strict";
import { liveCollection, subscribe } from "../../dist/index.js";
import { Streamgate, eventually, missingBinaries, probe, uniqueDb, mongodForFile, canonical, prng } from "./harness.mjs";

const skip = missingBinaries();
const shared = mongodForFile(skip);

/** The collection as `{id: canonical doc}`. */
async function collectionState(db, coll) {
  const docs = await shared.mongod.client.find(db, coll);
  return Object.fromEntries(docs.map((d) => [String(d._id), canonical(d)]));
}

function mapState(map) {
  return Object.fromEntries([...map].map(([k, d]) => [k, canonical(d)]));
}

/** `count` random writes on integer ids [0, 60): inserts, $set/$inc/$unset, replaces, deletes. */
async function randomWrites(db, coll, count, seed) {
  const random = prng(seed);
  const pick = (n) => Math.floor(random() * n);
  for (let i = 0; i < count; i++) {
    const _id = pick(60);
    switch (pick(5)) {
      case 0:
        await shared.mongod.client.update(db, coll, { _id }, { $setOnInsert: { created: i }, $set: { n: i, tags: ["a", String(i)] } }, { upsert: true });
        break;
      case 1:
        await shared.mongod.client.update(db, coll, { _id }, { $inc: { count: 1 }, $set: { "nested.at": i, "nested.deep.x": pick(9) } });
        break;
      case 2:
        await shared.mongod.client.update(db, coll, { _id }, { $unset: { n: "", "nested.at": "" } });
        break;
      case 3:
        await shared.mongod.client.update(db, coll, { _id }, { _id, replaced: i, label: `r${pick(100)}` });
        break;
      default:
        await shared.mongod.client.delete(db, coll, { _id });
    }
  }
}

async function seed(db, coll, n) {
  await shared.mongod.client.insert(db, coll, Array.from({ length: n }, (_, i) => ({ _id: i, n: i, nested: { at: -1 } })));
}

/** Waits until `live` equals the collection (bounded), then asserts it. */
async function assertEqualsCollection(read, db, coll) {
  let expected;
  await eventually(`the live map equals ${db}.${coll}`, 30_000, async () => {
    expected = await collectionState(db, coll);
    return canonical(mapState(read())) === canonical(expected);
  }).catch(() => undefined);
  assert.deepEqual(mapState(read()), expected);
}

test("liveCollection (snapshot + changes) under random writes equals the collection", { skip, timeout: 120_000 }, async (t) => {
  const db = uniqueDb("js_live");
  await seed(db, "c", 40);
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "c", name: "s" }] });
  const path = `/${db}/c/_streams/s`;
  const missing = await probe(sg, "snapshot", path);
  if (missing) {
    t.skip(missing);
    console.log(`# SKIPPED: ${missing}`);
    return sg.stop();
  }
  const live = liveCollection(sg.url(path), { retryMs: 200 });
  const writes = randomWrites(db, "c", 600, 1);
  await live.ready;
  await writes;
  await assertEqualsCollection(() => live.value, db, "c");
  live.close();
  await sg.stop();
});

test("history_lost: the state is rebuilt from a new snapshot and equals the collection", { skip, timeout: 120_000 }, async (t) => {
  const db = uniqueDb("js_lost");
  await seed(db, "c", 30);
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "c", name: "s" }] });
  const path = `/${db}/c/_streams/s`;
  const missing = await probe(sg, "snapshot", path);
  if (missing) {
    t.skip(missing);
    console.log(`# SKIPPED: ${missing}`);
    return sg.stop();
  }
  // A real id with its cluster time moved back to 1970: long gone from the oplog.
  const probeSub = subscribe(sg.url(path));
  let real;
  probeSub.on("change", (m) => (real = m.id));
  await eventually("probe connected", 10_000, () => probeSub.state === "open");
  await shared.mongod.client.insert(db, "c", [{ _id: 1000, n: 1000 }]);
  await eventually("a real id", 10_000, () => real);
  probeSub.close();
  const ancient = `82${"0000000100000001"}${real.slice(18)}`;

  const live = liveCollection(sg.url(path), { lastEventId: ancient, retryMs: 200 });
  const resets = [];
  live.on("reset", (r) => resets.push(r));
  await live.ready;
  assert.deepEqual(resets, [{ reason: "history_lost", snapshot: true }]);
  await assertEqualsCollection(() => live.value, db, "c");
  await randomWrites(db, "c", 200, 2);
  await assertEqualsCollection(() => live.value, db, "c");
  live.close();
  await sg.stop();
});

test("liveCollection over the document view (.json) under random writes equals the collection", { skip, timeout: 120_000 }, async (t) => {
  const db = uniqueDb("js_view");
  await seed(db, "c", 40);
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "c", name: "s" }] });
  const path = `/${db}/c/_streams/s`;
  const missing = await probe(sg, "view", path);
  if (missing) {
    t.skip(missing);
    console.log(`# SKIPPED: ${missing}`);
    return sg.stop();
  }
  const live = liveCollection(sg.url(path), { view: true, retryMs: 200 });
  const writes = randomWrites(db, "c", 600, 3);
  await live.ready;
  await writes;
  await assertEqualsCollection(() => live.value, db, "c");
  live.close();
  await sg.stop();
});

test("liveCollection of two streams over one /_streams connection equals both collections", { skip, timeout: 120_000 }, async (t) => {
  const db = uniqueDb("js_multi");
  const sg = await Streamgate.start(shared.mongod, { streams: [{ db, coll: "a", name: "s" }, { db, coll: "b", name: "s" }] });
  const A = `/${db}/a/_streams/s`;
  const B = `/${db}/b/_streams/s`;
  const missing = await probe(sg, "multi", A);
  if (missing) {
    t.skip(missing);
    console.log(`# SKIPPED: ${missing}`);
    return sg.stop();
  }
  // Without snapshots on /_streams the state can only be known from empty collections.
  const noSnapshot = await probe(sg, "multiSnapshot", A);
  if (noSnapshot) console.log(`# NOTE: ${noSnapshot}; starting from empty collections`);
  else {
    await seed(db, "a", 20);
    await seed(db, "b", 25);
  }
  const live = liveCollection([sg.url(A), sg.url(B)], { retryMs: 200 });
  const incomplete = [];
  live.on("incomplete", (i) => incomplete.push(i.stream));
  // From empty collections, writes must not start before the server holds the subscription.
  await eventually("connected", 10_000, () => live.subscription.state === "open");
  const writes = Promise.all([randomWrites(db, "a", 300, 4), randomWrites(db, "b", 300, 5)]);
  await writes;
  await live.ready;
  await assertEqualsCollection(() => live.value.get(A), db, "a");
  await assertEqualsCollection(() => live.value.get(B), db, "b");
  if (!noSnapshot) assert.deepEqual(incomplete, []);
  live.close();
  await sg.stop();
});

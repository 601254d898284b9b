// The SSE and NDJSON parsers on recorded Streamgate output, fed in every possible split.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SseParser, NdjsonParser } from "../../dist/index.js";

// Recorded from a Streamgate SSE subscribe (ids shortened): retry, a keep-alive comment, two
// changes, then history_lost with its empty `id:` line.
const RECORDED =
  "retry: 2000\n\n" +
  ": keep-alive\n\n" +
  'id: 8265A1B2C3000000012B0229296E04\nevent: change\ndata: {"operationType":"insert","fullDocument":{"_id":1}}\n\n' +
  'id: 8265A1B2C3000000022B0229296E04\nevent: change\ndata: {"operationType":"delete","documentKey":{"_id":1}}\n\n' +
  'id:\nevent: error\ndata: {"code":"history_lost","message":"gone"}\n\n';

function parseAll(chunks, start = "") {
  const frames = [];
  const retries = [];
  const parser = new SseParser({ frame: (f) => frames.push(f), retry: (ms) => retries.push(ms) }, start);
  for (const chunk of chunks) parser.push(chunk);
  return { frames, retries };
}

test("SSE: the same frames whatever the chunking, CRLF included", () => {
  const expected = parseAll([RECORDED]);
  assert.deepEqual(expected.retries, [2000]);
  assert.deepEqual(
    expected.frames.map((f) => [f.event, f.lastEventId, f.hasId]),
    [
      ["change", "8265A1B2C3000000012B0229296E04", true],
      ["change", "8265A1B2C3000000022B0229296E04", true],
      ["error", "", true],
    ],
  );
  for (const text of [RECORDED, RECORDED.replaceAll("\n", "\r\n"), RECORDED.replaceAll("\n", "\r")]) {
    for (let cut = 0; cut <= text.length; cut++) {
      const got = parseAll([text.slice(0, cut), text.slice(cut)]);
      assert.deepEqual(got.frames, expected.frames, `cut at ${cut}`);
    }
    const one = parseAll([...text]);
    assert.deepEqual(one.frames, expected.frames);
  }
});

test("SSE: a frame cut off by the end of the connection is not reported, its id not taken", () => {
  const { frames } = parseAll(['id: A\nevent: change\ndata: {"n":1}\n\nid: B\nevent: change\ndata: {"n"'], "Z");
  assert.equal(frames.length, 1);
  assert.equal(frames[0].lastEventId, "A");
});

test("SSE: the id persists across frames without one; BOM, multi-line data, id-only frame", () => {
  const { frames } = parseAll(["\uFEFFid: A\ndata: a\ndata: b\n\nevent: x\ndata: c\n\nid: C\n\n"], "");
  assert.deepEqual(
    frames.map((f) => [f.event, f.data, f.lastEventId, f.hasId]),
    [
      ["message", "a\nb", "A", true],
      ["x", "c", "A", false],
      ["", "", "C", true],
    ],
  );
});

test("NDJSON: envelopes, keep-alive lines, multi-stream names, bare documents, garbage", () => {
  const frames = [];
  const parser = new NdjsonParser({ frame: (f) => frames.push(f) }, "S");
  const text =
    '{"event":"change","id":"A","data":{"n":1}}\n\n' +
    '{"stream":"/d/c/_streams/a","event":"change","id":"P1","data":{"n":2}}\n' +
    '{"operationType":"insert"}\n' +
    "not json\n";
  for (const ch of text) parser.push(ch);
  assert.deepEqual(
    frames.map((f) => [f.event, f.lastEventId, f.stream, f.decoded?.value]),
    [
      ["change", "A", undefined, { n: 1 }],
      ["change", "P1", "/d/c/_streams/a", { n: 2 }],
      ["change", "P1", undefined, { operationType: "insert" }],
      ["error", "P1", undefined, undefined],
    ],
  );
  assert.equal(JSON.parse(frames[3].data).code, "bad_frame");
});

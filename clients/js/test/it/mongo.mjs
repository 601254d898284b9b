// A minimal MongoDB client for the tests (OP_MSG over one socket, a small BSON codec): just
// enough to insert, update, delete, read back, drop and commit a transaction. The package keeps
// no dependencies, so the tests carry this instead of the driver.
import { randomBytes } from "node:crypto";
import net from "node:net";

/** BSON binary data of a subtype (4: a UUID, as a session id is). */
export class Binary {
  constructor(bytes, subtype = 0) {
    this.bytes = bytes;
    this.subtype = subtype;
  }
}

/** A BSON ObjectId (12 bytes). */
export class ObjectId {
  static #counter = Math.floor(Math.random() * 0xffffff);
  constructor(hex) {
    if (hex) this.bytes = Buffer.from(hex, "hex");
    else {
      this.bytes = Buffer.alloc(12);
      this.bytes.writeUInt32BE(Math.floor(Date.now() / 1000), 0);
      this.bytes.writeUInt32BE(Math.floor(Math.random() * 0xffffffff), 4);
      this.bytes.writeUIntBE((ObjectId.#counter = (ObjectId.#counter + 1) % 0xffffff), 9, 3);
    }
  }
  toHexString() {
    return this.bytes.toString("hex");
  }
}

/** A BSON Timestamp (as found in replies). */
export class Timestamp {
  constructor(t, i) {
    this.t = t;
    this.i = i;
  }
}

function cstring(s) {
  return Buffer.concat([Buffer.from(s, "utf8"), Buffer.from([0])]);
}

function encodeValue(value) {
  if (value === null || value === undefined) return [0x0a, Buffer.alloc(0)];
  if (typeof value === "boolean") return [0x08, Buffer.from([value ? 1 : 0])];
  if (typeof value === "string") {
    const s = Buffer.from(value, "utf8");
    const len = Buffer.alloc(4);
    len.writeInt32LE(s.length + 1);
    return [0x02, Buffer.concat([len, s, Buffer.from([0])])];
  }
  if (typeof value === "bigint") {
    const b = Buffer.alloc(8);
    b.writeBigInt64LE(value);
    return [0x12, b];
  }
  if (typeof value === "number") {
    if (Number.isInteger(value) && value >= -0x80000000 && value <= 0x7fffffff) {
      const b = Buffer.alloc(4);
      b.writeInt32LE(value);
      return [0x10, b];
    }
    if (Number.isSafeInteger(value)) return encodeValue(BigInt(value));
    const b = Buffer.alloc(8);
    b.writeDoubleLE(value);
    return [0x01, b];
  }
  if (value instanceof ObjectId) return [0x07, value.bytes];
  if (value instanceof Binary) {
    const head = Buffer.alloc(5);
    head.writeInt32LE(value.bytes.length);
    head[4] = value.subtype;
    return [0x05, Buffer.concat([head, value.bytes])];
  }
  if (value instanceof Date) {
    const b = Buffer.alloc(8);
    b.writeBigInt64LE(BigInt(value.getTime()));
    return [0x09, b];
  }
  if (Array.isArray(value)) return [0x04, encode(Object.fromEntries(value.map((v, i) => [String(i), v])))];
  return [0x03, encode(value)];
}

/** Encodes a plain object as a BSON document. */
export function encode(doc) {
  const parts = [];
  for (const [key, value] of Object.entries(doc)) {
    if (value === undefined) continue;
    const [type, bytes] = encodeValue(value);
    parts.push(Buffer.from([type]), cstring(key), bytes);
  }
  const body = Buffer.concat(parts);
  const out = Buffer.alloc(body.length + 5);
  out.writeInt32LE(out.length);
  body.copy(out, 4);
  return out;
}

/** Decodes a BSON document at `offset` of `buf`. */
export function decode(buf, offset = 0, array = false) {
  const size = buf.readInt32LE(offset);
  const end = offset + size - 1;
  let at = offset + 4;
  const out = array ? [] : {};
  while (at < end) {
    const type = buf[at++];
    const nameEnd = buf.indexOf(0, at);
    const name = buf.toString("utf8", at, nameEnd);
    at = nameEnd + 1;
    let value;
    switch (type) {
      case 0x01:
        value = buf.readDoubleLE(at);
        at += 8;
        break;
      case 0x02: {
        const len = buf.readInt32LE(at);
        value = buf.toString("utf8", at + 4, at + 4 + len - 1);
        at += 4 + len;
        break;
      }
      case 0x03:
      case 0x04: {
        const len = buf.readInt32LE(at);
        value = decode(buf, at, type === 0x04);
        at += len;
        break;
      }
      case 0x05: {
        const len = buf.readInt32LE(at);
        value = buf.subarray(at + 5, at + 5 + len);
        at += 5 + len;
        break;
      }
      case 0x07:
        value = new ObjectId(buf.toString("hex", at, at + 12));
        at += 12;
        break;
      case 0x08:
        value = buf[at++] === 1;
        break;
      case 0x09:
        value = new Date(Number(buf.readBigInt64LE(at)));
        at += 8;
        break;
      case 0x0a:
        value = null;
        break;
      case 0x10:
        value = buf.readInt32LE(at);
        at += 4;
        break;
      case 0x11:
        value = new Timestamp(buf.readUInt32LE(at + 4), buf.readUInt32LE(at));
        at += 8;
        break;
      case 0x12: {
        const n = buf.readBigInt64LE(at);
        value = n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n;
        at += 8;
        break;
      }
      case 0x13:
        value = buf.subarray(at, at + 16);
        at += 16;
        break;
      default:
        throw new Error(`BSON type 0x${type.toString(16)} not supported by the test client`);
    }
    if (array) out.push(value);
    else out[name] = value;
  }
  return out;
}

/** One connection to a mongod; `command()` runs one command at a time, in order. */
export class Mongo {
  static async connect(port) {
    const socket = net.connect({ host: "127.0.0.1", port });
    await new Promise((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    return new Mongo(socket);
  }

  constructor(socket) {
    this.socket = socket;
    this.requestId = 1;
    this.pending = new Map();
    this.buffer = Buffer.alloc(0);
    this.queue = Promise.resolve();
    socket.on("data", (chunk) => this.#data(chunk));
    socket.on("error", (error) => this.#failAll(error));
    socket.on("close", () => this.#failAll(new Error("mongod connection closed")));
  }

  #failAll(error) {
    for (const { reject } of this.pending.values()) reject(error);
    this.pending.clear();
  }

  #data(chunk) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    while (this.buffer.length >= 4) {
      const len = this.buffer.readInt32LE(0);
      if (this.buffer.length < len) return;
      const message = this.buffer.subarray(0, len);
      this.buffer = this.buffer.subarray(len);
      const responseTo = message.readInt32LE(8);
      // OP_MSG: header (16), flags (4), section kind 0 (1), the document.
      const doc = decode(message, 21);
      const waiter = this.pending.get(responseTo);
      this.pending.delete(responseTo);
      waiter?.resolve(doc);
    }
  }

  /** Runs `cmd` against database `db`; throws when `ok` is not 1. */
  command(db, cmd) {
    const run = () =>
      new Promise((resolve, reject) => {
        const id = this.requestId++;
        const body = encode({ ...cmd, $db: db });
        const header = Buffer.alloc(21);
        header.writeInt32LE(21 + body.length, 0);
        header.writeInt32LE(id, 4);
        header.writeInt32LE(0, 8);
        header.writeInt32LE(2013, 12);
        header.writeUInt32LE(0, 16);
        header[20] = 0;
        this.pending.set(id, {
          resolve: (doc) => (doc.ok === 1 ? resolve(doc) : reject(new Error(`${Object.keys(cmd)[0]} failed: ${doc.errmsg ?? JSON.stringify(doc)}`))),
          reject,
        });
        this.socket.write(Buffer.concat([header, body]));
      });
    const result = this.queue.then(run, run);
    this.queue = result.catch(() => undefined);
    return result;
  }

  insert(db, coll, documents) {
    return this.command(db, { insert: coll, documents, ordered: true });
  }

  update(db, coll, q, u, options = {}) {
    return this.command(db, { update: coll, updates: [{ q, u, ...options }] });
  }

  delete(db, coll, q, limit = 1) {
    return this.command(db, { delete: coll, deletes: [{ q, limit }] });
  }

  /**
   * Runs `body(run)` as one multi-document transaction on a new session and commits it (aborts
   * it if `body` throws): `run(cmd)` sends `cmd` to `db` inside the transaction.
   */
  async transaction(db, body) {
    const session = { lsid: { id: new Binary(randomBytes(16), 4) }, txnNumber: 1n, autocommit: false };
    let first = true;
    const run = (cmd) => {
      const start = first ? { startTransaction: true } : {};
      first = false;
      return this.command(db, { ...cmd, ...session, ...start });
    };
    try {
      await body(run);
    } catch (error) {
      if (!first) await this.command("admin", { abortTransaction: 1, ...session }).catch(() => undefined);
      throw error;
    }
    await this.command("admin", { commitTransaction: 1, ...session });
  }

  drop(db, coll) {
    return this.command(db, { drop: coll }).catch(() => undefined);
  }

  /** Every document of `coll` matching `filter`. */
  async find(db, coll, filter = {}) {
    let reply = await this.command(db, { find: coll, filter, batchSize: 10_000 });
    const docs = [...reply.cursor.firstBatch];
    while (reply.cursor.id !== 0 && reply.cursor.id !== 0n) {
      reply = await this.command(db, { getMore: BigInt(reply.cursor.id), collection: coll, batchSize: 10_000 });
      docs.push(...reply.cursor.nextBatch);
    }
    return docs;
  }

  close() {
    this.socket.destroy();
  }
}

/**
 * Pure functions that fold Streamgate events into a `Map` of documents: change events (and
 * snapshot events, which are synthetic inserts) per PROTOCOL.md §6, and the document view's
 * `put` / `patch` per §7. No I/O, so they are unit-tested on recorded events.
 */

/** A document as the stream delivers it (relaxed Extended JSON). */
export type Doc = Record<string, unknown>;

/**
 * The text key of a document `_id`, the same text the server uses as the document view's
 * keys: a string as is, an ObjectId as its hex, an integer as its digits, anything else as
 * its relaxed Extended JSON.
 */
export function idKey(id: unknown): string {
  if (typeof id === "string") return id;
  if (typeof id === "number" && Number.isInteger(id)) return String(id);
  if (id !== null && typeof id === "object" && !Array.isArray(id)) {
    const o = id as Record<string, unknown>;
    const keys = Object.keys(o);
    if (keys.length === 1) {
      if (typeof o.$oid === "string") return o.$oid.toLowerCase();
      if (typeof o.$numberLong === "string") return o.$numberLong;
    }
  }
  return JSON.stringify(id);
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  v !== null && typeof v === "object" && !Array.isArray(v);

/** Sets `value` at `path` (names) inside `target`, creating objects on the way. */
function setPath(target: unknown, path: string[], value: unknown, remove: boolean): void {
  let node = target as Record<string, unknown> | unknown[];
  for (let i = 0; i < path.length - 1; i++) {
    const step = path[i];
    const next = (node as Record<string, unknown>)[step];
    if (next === null || typeof next !== "object") {
      if (remove) return;
      (node as Record<string, unknown>)[step] = {};
    }
    node = (node as Record<string, unknown>)[step] as Record<string, unknown>;
  }
  const last = path[path.length - 1];
  if (remove) {
    // An array keeps its length (MongoDB's $unset of an element leaves null there).
    if (Array.isArray(node)) {
      const index = Number(last);
      if (Number.isInteger(index) && index < node.length) node[index] = null;
    } else delete node[last];
  } else (node as Record<string, unknown>)[last] = value;
}

/** Applies an `updateDescription` to a copy of `doc` (when no full document came with it). */
export function applyUpdateDescription(doc: Doc, description: unknown): Doc {
  const copy = structuredCloneJson(doc);
  if (!isObject(description)) return copy;
  const truncated = Array.isArray(description.truncatedArrays) ? description.truncatedArrays : [];
  for (const t of truncated) {
    if (!isObject(t) || typeof t.field !== "string" || typeof t.newSize !== "number") continue;
    const array = t.field.split(".").reduce<unknown>((v, k) => (isObject(v) || Array.isArray(v) ? (v as Record<string, unknown>)[k] : undefined), copy);
    if (Array.isArray(array)) array.length = Math.min(array.length, t.newSize);
  }
  if (isObject(description.updatedFields)) {
    for (const [field, value] of Object.entries(description.updatedFields)) {
      setPath(copy, field.split("."), value, false);
    }
  }
  if (Array.isArray(description.removedFields)) {
    for (const field of description.removedFields) {
      if (typeof field === "string") setPath(copy, field.split("."), undefined, true);
    }
  }
  return copy;
}

function structuredCloneJson<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

/**
 * Folds one change (or snapshot) event into `docs`. Returns whether `docs` changed.
 *
 * insert / replace / update with a full document: the document; update without one: the
 * delta applied to what we hold; delete: gone; drop / rename / dropDatabase: the collection
 * is gone, so every document is. A change marked `"streamgate":{"membership":"left"}` removes
 * the document (it stopped matching the stream's filter); `"entered"` sets it whole (it
 * started matching), PROTOCOL.md §10.
 */
export function applyChange(docs: Map<string, Doc>, change: unknown): boolean {
  if (!isObject(change)) return false;
  const op = change.operationType;
  const key = isObject(change.documentKey) && "_id" in change.documentKey ? idKey(change.documentKey._id) : undefined;
  const full = isObject(change.fullDocument) ? change.fullDocument : undefined;
  const membership = isObject(change.streamgate) ? change.streamgate.membership : undefined;
  if (membership === "left") return key !== undefined && docs.delete(key);
  if (membership === "entered") {
    if (key === undefined || !full) return false;
    docs.set(key, full);
    return true;
  }
  switch (op) {
    case "insert":
    case "replace":
      if (key === undefined && full && "_id" in full) {
        docs.set(idKey(full._id), full);
        return true;
      }
      if (key === undefined || !full) return false;
      docs.set(key, full);
      return true;
    case "update": {
      if (key === undefined) return false;
      if (full) {
        docs.set(key, full);
        return true;
      }
      const held = docs.get(key);
      if (!held || !("updateDescription" in change)) return false;
      docs.set(key, applyUpdateDescription(held, change.updateDescription));
      return true;
    }
    case "delete":
      return key !== undefined && docs.delete(key);
    case "drop":
    case "rename":
    case "dropDatabase":
      if (docs.size === 0) return false;
      docs.clear();
      return true;
    default:
      return false;
  }
}

/**
 * Applies a document-view event (`put` / `patch`, PROTOCOL.md §7) to `docs`.
 *
 * `put /` replaces everything; `put /<id>` sets or (with `null`) deletes one document; `patch
 * /<id>` sets each child path (`a/b`, Firebase's multi-path update; `null` removes it).
 * The id is everything after the first `/` (ids may themselves contain `/`).
 */
export function applyView(docs: Map<string, Doc>, event: string, body: unknown): boolean {
  if (!isObject(body) || typeof body.path !== "string") return false;
  const path = body.path;
  const data = body.data;
  if (event === "put" && (path === "/" || path === "")) {
    docs.clear();
    if (isObject(data)) for (const [id, doc] of Object.entries(data)) if (isObject(doc)) docs.set(id, doc);
    return true;
  }
  if (!path.startsWith("/")) return false;
  const id = path.slice(1);
  if (event === "put") {
    if (isObject(data)) docs.set(id, data);
    else docs.delete(id);
    return true;
  }
  if (event === "patch" && isObject(data)) {
    const copy = structuredCloneJson(docs.get(id) ?? {});
    for (const [child, value] of Object.entries(data)) {
      setPath(copy, child.split("/"), value, value === null);
    }
    docs.set(id, copy);
    return true;
  }
  return false;
}

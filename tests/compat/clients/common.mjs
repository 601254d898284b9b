// What every Node client of the compatibility suite shares (the twin of common.py): settings
// from the environment (set by tests/compat/run.mjs), the collection rebuilt from change
// events, and the JSON lines reported on stdout ({"ready"}, {"final"}, {"terminal"}).
import { createHmac } from "node:crypto";

export const BASE = process.env.SG_URL;
export const PATH = process.env.SG_PATH;
export const SECRET = process.env.SG_SECRET;
const TOKEN_SECS = Number(process.env.SG_TOKEN_SECS || 3);
export const END = "~end";

/** A fresh HS256 JWT (role reader) when auth is on, as an app would get from its auth server. */
export function token() {
  if (!SECRET) return undefined;
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + TOKEN_SECS + 1; // valid for more than TOKEN_SECS
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: "compat", roles: ["reader"], aud: "streamgate", exp })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export function report(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

/** Leaves once stdout is flushed. */
export function finish() {
  process.stdout.write("", () => process.exit(0));
}

/** A collection rebuilt from change events; change ids kept to show each arrived once, in order. */
export class Changes {
  docs = new Map();
  ids = [];
  connects = 0;
  lastId = undefined;

  /** Applies one event; true when the end marker arrived. */
  apply(name, id, data) {
    if (name === "snapshot" || name === "change") {
      const key = data.documentKey._id;
      if (data.operationType === "delete") this.docs.delete(key);
      else if (data.fullDocument != null) this.docs.set(key, data.fullDocument);
      if (id) this.lastId = id;
      if (name === "change") {
        this.ids.push(id);
        if (key === END) {
          this.docs.delete(key);
          return true;
        }
      }
    } else if (name === "ready") {
      report({ ready: true });
    } else if (["cancel", "auth_revoked", "error", "invalidate"].includes(name)) {
      report({ terminal: name, data });
      if (name !== "auth_revoked") finish();
    }
    return false;
  }

  final() {
    report({
      final: Object.fromEntries(this.docs),
      changes: this.ids.length,
      ordered: this.ids.every((id, i) => i === 0 || this.ids[i - 1] < id),
      connects: this.connects,
    });
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A scripted stand-in for `fetch`: each request becomes a `Connection` the test drives (status,
// headers, body chunks, end, network error), so the client's reaction to recorded/synthetic
// streams is checked byte for byte, without a server.

/** One request the client made, and its response the test writes. */
export class Connection {
  constructor(url, init) {
    this.url = new URL(url);
    this.headers = Object.fromEntries(Object.entries(init.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
    this.signal = init.signal;
    this.aborted = new Promise((resolve) => init.signal?.addEventListener("abort", resolve, { once: true }));
    this.responded = new Promise((resolve) => (this.respond = resolve));
  }

  /** Answers with a streaming 200 (SSE unless `type` says otherwise); returns itself. */
  open(type = "text/event-stream") {
    const stream = new ReadableStream({
      start: (controller) => (this.controller = controller),
      cancel: () => {
        this.cancelled = true;
      },
    });
    this.signal?.addEventListener("abort", () => {
      try {
        this.controller.error(new DOMException("aborted", "AbortError"));
      } catch {}
    });
    this.respond(new Response(stream, { status: 200, headers: { "content-type": type } }));
    return this;
  }

  /** Answers with a status and a problem body. */
  status(status, body = { title: "refused", detail: `status ${status}` }, headers = {}) {
    this.respond(new Response(JSON.stringify(body), { status, headers: { "content-type": "application/problem+json", ...headers } }));
  }

  /** Writes text to the body. */
  push(text) {
    this.controller.enqueue(new TextEncoder().encode(text));
  }

  /** Ends the body normally. */
  end() {
    try {
      this.controller.close();
    } catch {}
  }

  /** Breaks the body (like a killed server). */
  fail() {
    try {
      this.controller.error(new TypeError("terminated"));
    } catch {}
  }
}

/** The fake: `fake.fetch` for the client, `await fake.next()` for the test. */
export function fakeServer() {
  const waiting = [];
  const queued = [];
  const all = [];
  const fetch = async (url, init = {}) => {
    const connection = new Connection(url, init);
    all.push(connection);
    const waiter = waiting.shift();
    if (waiter) waiter(connection);
    else queued.push(connection);
    return connection.responded;
  };
  const next = (timeoutMs = 5000) =>
    new Promise((resolve, reject) => {
      const connection = queued.shift();
      if (connection) return resolve(connection);
      const timer = setTimeout(() => reject(new Error("no request came")), timeoutMs);
      waiting.push((c) => {
        clearTimeout(timer);
        resolve(c);
      });
    });
  return { fetch, next, all };
}

/** Collects what a subscription reports, and waits for a condition with a deadline. */
export function recorder(sub, types = ["message", "state", "reset", "failure", "close"]) {
  const log = [];
  for (const type of types) sub.on(type, (value) => log.push({ type, value }));
  log.until = async (predicate, timeoutMs = 5000) => {
    const deadline = Date.now() + timeoutMs;
    while (!predicate(log)) {
      if (Date.now() > deadline) throw new Error(`timed out; log: ${JSON.stringify(log.slice(-10))}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  log.of = (type) => log.filter((e) => e.type === type).map((e) => e.value);
  return log;
}

/** An SSE change frame. */
export const change = (id, seq, extra = "") =>
  `id: ${id}\nevent: change\ndata: {"operationType":"insert","documentKey":{"_id":${seq}},"fullDocument":{"_id":${seq},"seq":${seq}}${extra}}\n\n`;

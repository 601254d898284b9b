/**
 * `subscribe(url, options)`: one Streamgate subscription that outlives its connections.
 *
 * ```text
 *  getToken() ─▶ fetch(url, Authorization, Last-Event-ID) ─▶ SSE / NDJSON parser ─▶ listeners
 *        ▲                    │ status / network error / idle / end of body
 *        └── reconnect ◀──────┘ after a delay: the server's `retry:` (or `retryMs`) doubled per
 *                               failed attempt up to `maxRetryMs`, times 1–1.5 (jitter)
 * ```
 *
 * The position is the SSE last event id (a change's resume token; on `/_streams` the
 * composite position of every stream). It moves only when a whole frame has been handed to
 * the listeners, so a connection cut in the middle of a frame resumes before it: no loss, and
 * the server's exactly-once resume means no duplicate.
 *
 * Terminal events, as PROTOCOL.md means them:
 * - `error` `slow_consumer`: resume from the last id at once.
 * - `error` `history_lost`: the position is gone; the app is told (`reset`) and the stream
 *   starts again from now, with `snapshot=true` when the subscription uses snapshots.
 * - `auth_revoked` (and HTTP 401): `getToken()` again, then resume from the last id.
 * - `cancel`: reconnect once (the stream may have a new definition); a second `cancel`
 *   without any event in between, or a 403/404, ends the subscription.
 * - `invalidate`: the collection was dropped or renamed; the subscription ends.
 * - `error` `shutdown` / end of body / network error / 5xx / 429 / 503: reconnect after the
 *   delay (at least `Retry-After`).
 * - other 4xx (400, 403, 404, 406, 413): the request itself is wrong; the subscription ends.
 *
 * On `/_streams?streams=…` the same events concern one stream (named by `stream`): that
 * stream is resumed, restarted or dropped, the others go on.
 */

import { NdjsonParser, RawFrame, SseParser } from "./parse.js";

/** How events travel: Server-Sent Events (default) or newline-delimited JSON. */
export type Transport = "sse" | "ndjson";

/** Where a subscription stands. */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** One event from the server, its `data` decoded. */
export interface StreamEvent<T = any> {
  /** `change`, `snapshot`, `ready`, `put`, `patch`, `info`, `skipped`, `heartbeat`, `error`,
   * `cancel`, `auth_revoked`, `invalidate`, … */
  event: string;
  /** The event's id when it carried one (on `/_streams`: the composite position). */
  id?: string;
  /** The decoded `data`. */
  data: T;
  /** `/_streams` only: the stream this event belongs to (`/db/coll/_streams/name`). */
  stream?: string;
}

/** Why `getToken` is being asked. */
export interface TokenRequest {
  /** `connect`: a (re)connection; `auth_revoked` / `unauthorized`: the last token was refused
   * or expired, so return a fresh one. */
  reason: "connect" | "auth_revoked" | "unauthorized";
}

/** A connection state change. */
export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
  /** `open`: the position this connection resumed from (`""`: from now / a fresh snapshot). */
  resumedFrom?: string;
  /** `reconnecting`: milliseconds until the next attempt. */
  delayMs?: number;
  /** `reconnecting`: consecutive attempts without progress so far. */
  attempt?: number;
}

/** The app must rebuild its state: the server no longer holds this position. */
export interface ResetInfo {
  reason: "history_lost";
  /** The next connection starts with a snapshot (`snapshot` / `ready` events, or the view's
   * first `put`), so the rebuilt state is complete. */
  snapshot: boolean;
  /** `/_streams` only: the stream concerned. */
  stream?: string;
}

/** A connection attempt or a connection failed; the subscription goes on unless `fatal`. */
export interface FailureInfo {
  /** `http` (with `status`), `network`, `idle` (no bytes for `idleTimeoutMs`), `token`
   * (`getToken` threw), `protocol` (not an event stream), or a server error `code`. */
  kind: string;
  status?: number;
  /** Problem body `detail` / `title`, or the error's message. */
  message: string;
  /** Whether the subscription ends because of it. */
  fatal: boolean;
  /** `/_streams` only: the stream concerned. */
  stream?: string;
}

/** Why a subscription ended. */
export interface CloseInfo {
  /** `closed` (by the app), `invalidate`, `cancel`, `http` (a 4xx that retrying cannot fix),
   * `protocol`, `no_streams` (`/_streams`: every stream ended). */
  reason: string;
  failure?: FailureInfo;
}

/** Listener payloads by name; server events by their own names. */
export interface SubscriptionEvents {
  /** Every server event. */
  message: StreamEvent;
  state: StateChange;
  reset: ResetInfo;
  failure: FailureInfo;
  close: CloseInfo;
  [serverEvent: string]: any;
}

/** Options of [`subscribe`]. */
export interface SubscribeOptions {
  /** `sse` (default) or `ndjson`. */
  transport?: Transport;
  /** Resume after this id (else start from now). */
  lastEventId?: string;
  /** Called before each connection and again after `auth_revoked` / 401; its token is sent as
   * `Authorization: Bearer …` (or as `tokenParam`). */
  getToken?: (request: TokenRequest) => string | null | undefined | Promise<string | null | undefined>;
  /** Send the token as this query parameter (`access_token`; `auth` for the document view)
   * instead of the header. */
  tokenParam?: string;
  /** Extra request headers. */
  headers?: Record<string, string>;
  /** Extra query parameters (`rewind`, `operationType`, `heartbeats`, …). */
  params?: Record<string, string | number | boolean>;
  /** Values for the definition's `$var`s (sent as `avars`). */
  avars?: Record<string, unknown>;
  /** `snapshot=true`: current documents first (`snapshot` events, then `ready`). */
  snapshot?: boolean;
  /** After `history_lost`, restart with `snapshot=true` even if `snapshot` is off. */
  snapshotOnHistoryLost?: boolean;
  /** First reconnect delay when the server sent no `retry:` (default 1000 ms). */
  retryMs?: number;
  /** Longest reconnect delay (default 30000 ms). */
  maxRetryMs?: number;
  /** Reconnect when no byte came for this long (default 45000 ms: three keep-alives; 0: never). */
  idleTimeoutMs?: number;
  /** `fetch` to use (default the global one). */
  fetch?: typeof fetch;
  /** `credentials` of the fetch (`include` to send cookies cross-origin). */
  credentials?: RequestCredentials;
  /** Aborting it closes the subscription. */
  signal?: AbortSignal;
  /** Gets what a listener throws (default: rethrown outside the stream's call stack, so it
   * surfaces as an uncaught error while the stream keeps its place). */
  onListenerError?: (error: unknown) => void;
  /** Random source in [0, 1) for the jitter (tests). */
  random?: () => number;
}

type Listener = (value: any) => void;

/** What to do once a connection is over. */
type Next =
  | { kind: "retry"; now?: boolean; minDelayMs?: number }
  | { kind: "stop"; info: CloseInfo };

/** Statuses that retrying can fix. */
const RETRYABLE = new Set([408, 425, 429, 500, 502, 503, 504]);
/** Events that show the subscription is making progress (not `info`, not terminal ones). */
const PROGRESS = new Set(["change", "snapshot", "ready", "put", "patch", "skipped"]);

/** One subscription: create it with [`subscribe`]. */
export class Subscription {
  private listeners = new Map<string, Set<Listener>>();
  private current: ConnectionState = "connecting";
  private position: string;
  private serverRetryMs: number | undefined;
  /** Consecutive attempts without progress: the exponent of the backoff. */
  private attempt = 0;
  private tokenReason: TokenRequest["reason"] = "connect";
  private connection: AbortController | undefined;
  private wake: (() => void) | undefined;
  private closeInfo: CloseInfo | undefined;
  private resolveClosed!: (info: CloseInfo) => void;
  /** Streams of a `/_streams` URL still subscribed (in order); `undefined` for one stream. */
  private streamList: string[] | undefined;
  /** Streams (or `""` for a single stream) reconnected once after a `cancel`, no event since. */
  private cancelled = new Set<string>();
  /** After `history_lost` with `snapshotOnHistoryLost`: ask for a snapshot from now on. */
  private wantSnapshot: boolean;
  private readonly url: URL;
  private readonly options: SubscribeOptions;
  private readonly fetchFn: typeof fetch;
  /** Resolves when the subscription has ended for good. */
  readonly closed: Promise<CloseInfo>;

  constructor(url: string | URL, options: SubscribeOptions = {}) {
    const base = typeof location !== "undefined" ? location.href : undefined;
    this.url = new URL(String(url), base);
    this.options = options;
    this.position = options.lastEventId ?? "";
    this.wantSnapshot = options.snapshot === true;
    if (!options.fetch && typeof fetch !== "function") throw new Error("streamgate: no fetch available (Node >= 18 or a browser)");
    // Called as a plain function: a browser's fetch throws "Illegal invocation" when called as
    // a method of anything but the window.
    const custom = options.fetch;
    this.fetchFn = custom ? (input, init) => custom(input, init) : (input, init) => fetch(input, init);
    if (this.url.pathname.endsWith("/_streams")) {
      this.streamList = (this.url.searchParams.get("streams") ?? "")
        .split(",")
        .map((s) => s.trim())
        .filter((s) => s.length > 0);
    }
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    options.signal?.addEventListener("abort", () => this.close(), { once: true });
    // Listeners are attached synchronously after `subscribe()` returns; start after that.
    queueMicrotask(() => void this.run());
  }

  /** Connection state now. */
  get state(): ConnectionState {
    return this.current;
  }

  /** The position a reconnection resumes from (`""`: from now). */
  get lastEventId(): string {
    return this.position;
  }

  /** `/_streams`: the streams still subscribed. */
  get streams(): string[] | undefined {
    return this.streamList?.slice();
  }

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof SubscriptionEvents & string>(type: K, listener: (value: SubscriptionEvents[K]) => void): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set!.delete(listener);
  }

  /** Ends the subscription (idempotent). */
  close(): void {
    this.finish({ reason: "closed" });
  }

  private finish(info: CloseInfo): void {
    if (this.closeInfo) return;
    this.closeInfo = info;
    this.connection?.abort();
    this.wake?.();
    this.setState("closed", {});
    this.emit("close", info);
    this.resolveClosed(info);
  }

  private emit(type: string, value: unknown): void {
    const set = this.listeners.get(type);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(value);
      } catch (error) {
        // An app bug must not cost the stream its place: report it outside this call stack.
        reportListenerError(error, this.options.onListenerError);
      }
    }
  }

  private setState(state: ConnectionState, extra: Partial<StateChange>): void {
    if (this.current === "closed") return;
    const previous = this.current;
    this.current = state;
    this.emit("state", { state, previous, ...extra });
  }

  /** The reconnect delay for the current attempt: base × 2^attempt (capped) × [1, 1.5). */
  private delay(): number {
    const base = this.serverRetryMs ?? this.options.retryMs ?? 1000;
    const max = this.options.maxRetryMs ?? 30_000;
    const d = Math.min(max, base * 2 ** Math.min(this.attempt, 30));
    return Math.round(d * (1 + 0.5 * (this.options.random ?? Math.random)()));
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    });
  }

  private async run(): Promise<void> {
    let next: Next | undefined;
    while (!this.closeInfo) {
      if (next?.kind === "stop") return this.finish(next.info);
      if (next) {
        // `now` (resume after slow_consumer, auth_revoked, cancel, history_lost) skips the
        // wait only while that keeps making progress; a loop of them backs off.
        let wait = next.now && this.attempt === 0 ? 0 : this.delay();
        wait = Math.max(wait, next.minDelayMs ?? 0);
        this.attempt++;
        this.setState("reconnecting", { delayMs: wait, attempt: this.attempt });
        if (wait > 0) await this.sleep(wait);
        if (this.closeInfo) return;
        this.setState("connecting", {});
      }
      next = await this.connectOnce();
    }
  }

  private failure(info: FailureInfo): void {
    this.emit("failure", info);
  }

  private requestUrl(token: string | undefined): string {
    const url = new URL(this.url.href);
    const o = this.options;
    for (const [k, v] of Object.entries(o.params ?? {})) url.searchParams.set(k, String(v));
    if (o.avars) url.searchParams.set("avars", JSON.stringify(o.avars));
    if (this.wantSnapshot) url.searchParams.set("snapshot", "true");
    if (this.streamList) url.searchParams.set("streams", this.streamList.join(","));
    if (token && o.tokenParam) url.searchParams.set(o.tokenParam, token);
    return url.href;
  }

  /** One connection, from `getToken` to the end of the body. */
  private async connectOnce(): Promise<Next> {
    let token: string | undefined;
    if (this.options.getToken) {
      try {
        token = (await this.options.getToken({ reason: this.tokenReason })) ?? undefined;
      } catch (error) {
        this.failure({ kind: "token", message: String((error as Error)?.message ?? error), fatal: false });
        return { kind: "retry" };
      }
      this.tokenReason = "connect";
    }
    if (this.closeInfo) return { kind: "retry" };
    const ndjson = this.options.transport === "ndjson";
    const headers: Record<string, string> = {
      accept: ndjson ? "application/x-ndjson" : "text/event-stream",
      ...this.options.headers,
    };
    if (token && !this.options.tokenParam) headers.authorization = `Bearer ${token}`;
    const resumedFrom = this.position;
    if (resumedFrom) headers["last-event-id"] = resumedFrom;
    const controller = new AbortController();
    this.connection = controller;
    let response: Response;
    try {
      response = await this.fetchFn(this.requestUrl(token), {
        headers,
        signal: controller.signal,
        cache: "no-store",
        credentials: this.options.credentials,
      });
    } catch (error) {
      if (!this.closeInfo) this.failure({ kind: "network", message: String((error as Error)?.message ?? error), fatal: false });
      return { kind: "retry" };
    }
    if (response.status !== 200 || !response.body) return this.refused(response, controller);
    const type = response.headers.get("content-type") ?? "";
    if (!type.includes(ndjson ? "application/x-ndjson" : "text/event-stream")) {
      controller.abort();
      const failure: FailureInfo = { kind: "protocol", status: 200, message: `not an event stream: content-type ${type || "(none)"}`, fatal: true };
      this.failure(failure);
      return { kind: "stop", info: { reason: "protocol", failure } };
    }
    this.setState("open", { resumedFrom });
    return this.read(response.body, controller, ndjson);
  }

  /** A non-200 answer: retry, refresh the token, or give up. */
  private async refused(response: Response, controller: AbortController): Promise<Next> {
    const status = response.status;
    let message = response.statusText || `HTTP ${status}`;
    try {
      const text = await response.text();
      try {
        const problem = JSON.parse(text);
        message = problem.detail || problem.title || message;
      } catch {
        if (text) message = text.slice(0, 300);
      }
    } catch {
      // The body is only for the message.
    }
    controller.abort();
    const retryAfter = Number(response.headers.get("retry-after"));
    const minDelayMs = Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : 0;
    if (status === 401 && this.options.getToken) {
      this.tokenReason = "unauthorized";
      this.failure({ kind: "http", status, message, fatal: false });
      return { kind: "retry", now: true };
    }
    if (RETRYABLE.has(status)) {
      this.failure({ kind: "http", status, message, fatal: false });
      return { kind: "retry", minDelayMs };
    }
    // `/_streams`: a stream reconnected after `cancel` that is now gone or refused is dropped;
    // the others go on.
    if ((status === 403 || status === 404) && this.streamList) {
      const gone = this.streamList.find((s) => this.cancelled.has(s) && message.includes(s));
      if (gone) {
        this.failure({ kind: "http", status, message, fatal: false, stream: gone });
        this.dropStream(gone);
        if (this.streamList.length === 0) return { kind: "stop", info: { reason: "no_streams" } };
        return { kind: "retry", now: true };
      }
    }
    const failure: FailureInfo = { kind: "http", status, message, fatal: true };
    this.failure(failure);
    return { kind: "stop", info: { reason: this.cancelled.size > 0 && (status === 403 || status === 404) ? "cancel" : "http", failure } };
  }

  private dropStream(stream: string): void {
    if (!this.streamList) return;
    this.streamList = this.streamList.filter((s) => s !== stream);
    this.cancelled.delete(stream);
  }

  /** Reads one response body to its end (or until a terminal event decides what is next). */
  private async read(body: ReadableStream<Uint8Array>, controller: AbortController, ndjson: boolean): Promise<Next> {
    let next: Next | undefined;
    const sink = {
      frame: (frame: RawFrame) => {
        if (!next) next = this.handle(frame);
      },
      retry: (ms: number) => {
        this.serverRetryMs = ms;
      },
    };
    const parser = ndjson ? new NdjsonParser(sink, this.position) : new SseParser(sink, this.position);
    const decoder = new TextDecoder();
    const reader = body.getReader();
    const idleMs = this.options.idleTimeoutMs ?? 45_000;
    let idle: ReturnType<typeof setTimeout> | undefined;
    let idleFired = false;
    const arm = () => {
      if (idleMs <= 0) return;
      if (idle !== undefined) clearTimeout(idle);
      idle = setTimeout(() => {
        idleFired = true;
        controller.abort();
      }, idleMs);
    };
    arm();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        arm();
        parser.push(decoder.decode(value, { stream: true }));
        if (next || this.closeInfo) break;
      }
    } catch (error) {
      if (!this.closeInfo && !next) {
        this.failure(
          idleFired
            ? { kind: "idle", message: `no data for ${idleMs} ms`, fatal: false }
            : { kind: "network", message: String((error as Error)?.message ?? error), fatal: false },
        );
      }
    } finally {
      if (idle !== undefined) clearTimeout(idle);
      controller.abort();
      reader.cancel().catch(() => undefined);
    }
    return next ?? { kind: "retry" };
  }

  /** One frame: update the position, tell the listeners, and decide on terminal events. */
  private handle(frame: RawFrame): Next | undefined {
    if (frame.event === "" && frame.data === "" && !frame.decoded) {
      // An `id:` line alone: it moves the position (an empty one resets it).
      this.position = frame.lastEventId;
      return undefined;
    }
    let data: unknown;
    if (frame.decoded) data = frame.decoded.value;
    else {
      try {
        data = JSON.parse(frame.data);
      } catch {
        data = frame.data;
      }
    }
    let event = frame.event;
    let stream = frame.stream;
    let id = frame.hasId ? frame.lastEventId : undefined;
    // `/_streams` over SSE: `data` is the envelope naming the stream.
    if (this.streamList && !stream && isEnvelope(data)) {
      stream = data.stream;
      event = data.event;
      data = data.data;
    }
    if (event === "keep-alive") return undefined;
    this.position = frame.lastEventId;
    const message: StreamEvent = { event, data, ...(id !== undefined ? { id } : {}), ...(stream !== undefined ? { stream } : {}) };
    if (PROGRESS.has(event)) {
      this.attempt = 0;
      this.cancelled.delete(stream ?? "");
    }
    this.emit("message", message);
    this.emit(event, message);
    return this.terminal(message);
  }

  private terminal(message: StreamEvent): Next | undefined {
    const { event, stream } = message;
    const code = typeof message.data?.code === "string" ? message.data.code : "";
    const text = typeof message.data?.message === "string" ? message.data.message : code || event;
    switch (event) {
      case "auth_revoked":
        this.tokenReason = "auth_revoked";
        return { kind: "retry", now: true };
      case "invalidate":
        if (stream && this.streamList) {
          this.dropStream(stream);
          return this.streamList.length === 0 ? { kind: "stop", info: { reason: "no_streams" } } : undefined;
        }
        return { kind: "stop", info: { reason: "invalidate" } };
      case "cancel": {
        const key = stream ?? "";
        if (this.cancelled.has(key)) {
          if (stream && this.streamList) {
            this.dropStream(stream);
            return this.streamList.length === 0 ? { kind: "stop", info: { reason: "no_streams" } } : undefined;
          }
          return { kind: "stop", info: { reason: "cancel" } };
        }
        this.cancelled.add(key);
        return { kind: "retry", now: true };
      }
      case "error":
        switch (code) {
          case "history_lost": {
            // Start again from now; the next connection's position must not name this one.
            if (!stream) this.position = "";
            if (this.options.snapshotOnHistoryLost) this.wantSnapshot = true;
            this.emit("reset", { reason: "history_lost", snapshot: this.wantSnapshot || this.isView(), ...(stream ? { stream } : {}) });
            return { kind: "retry", now: true };
          }
          case "slow_consumer":
            return { kind: "retry", now: true };
          case "shutdown":
            return { kind: "retry" };
          default:
            this.failure({ kind: code || "error", message: text, fatal: false, ...(stream ? { stream } : {}) });
            return { kind: "retry" };
        }
      default:
        return undefined;
    }
  }

  private isView(): boolean {
    return this.url.pathname.endsWith(".json") || this.url.searchParams.get("format") === "firebase";
  }
}

/** Hands a listener's exception to `handler`, or rethrows it from a fresh task. */
export function reportListenerError(error: unknown, handler?: (error: unknown) => void): void {
  if (handler) handler(error);
  else
    setTimeout(() => {
      throw error;
    }, 0);
}

function isEnvelope(data: unknown): data is { stream: string; event: string; data: unknown } {
  return (
    data !== null &&
    typeof data === "object" &&
    typeof (data as Record<string, unknown>).stream === "string" &&
    typeof (data as Record<string, unknown>).event === "string"
  );
}

/**
 * Subscribes to a Streamgate stream (`/db/coll/_streams/name`, its `.json` document view, or
 * `/_streams?streams=…`) and keeps it going across disconnects, restarts and token expiry.
 */
export function subscribe(url: string | URL, options: SubscribeOptions = {}): Subscription {
  return new Subscription(url, options);
}

/**
 * `liveCollection(url)`: a `Map` of a stream's current documents, kept up to date.
 *
 * Three sources, one state machine per stream:
 * - `snapshot=true` (default, PROTOCOL.md §6): `snapshot` events fill a pending map; `ready`
 *   swaps it in; changes after it are applied. A new snapshot (after `history_lost`) builds
 *   aside, so the app sees the old state until the new one is complete, never a half one.
 * - the document view (`view: true`, §7): the first `put /` is the whole state, then
 *   `put` / `patch` per change.
 * - several streams over one connection (`liveCollection([urlA, urlB])`, §8): one map per
 *   stream, keyed by the stream's path.
 *
 * Documents are keyed by their `_id` as text (see `idKey`). The emitted map is the live
 * instance: read it, do not mutate it; copy it if you need a snapshot of it.
 */

import { applyChange, applyView, Doc } from "./state.js";
import { reportListenerError, FailureInfo, ResetInfo, StateChange, StreamEvent, SubscribeOptions, Subscription, subscribe } from "./subscribe.js";

/** Options of [`liveCollection`]. */
export interface LiveOptions extends Omit<SubscribeOptions, "snapshot" | "transport"> {
  /** Use the `.json` document view instead of `snapshot=true` + change events (one stream). */
  view?: boolean;
}

/** Listener payloads of a live collection. */
export interface LiveEvents<S> {
  /** The state after each change (once complete: after `ready` / the first `put`). */
  data: S;
  /** The state must be rebuilt (history lost); `data` follows when it is. */
  reset: ResetInfo;
  /** The server ignored `snapshot=true`: the state holds only documents changed since. */
  incomplete: { stream?: string; message: string };
  state: StateChange;
  failure: FailureInfo;
  close: unknown;
}

/** Per stream: what is shown and what is being built. */
class StreamState {
  docs = new Map<string, Doc>();
  /** A snapshot being received (`snapshot` events seen, `ready` not yet). */
  pending: Map<string, Doc> | undefined;
  /** `ready` (or the view's first `put /`) seen at least once. */
  complete = false;
}

type Listener = (value: any) => void;

/** A live collection; `S` is `Map<id, doc>` for one stream, `Map<stream, Map<id, doc>>` for many. */
export class LiveCollection<S> {
  private listeners = new Map<string, Set<Listener>>();
  private states = new Map<string, StreamState>();
  private resolveReady!: () => void;
  /** The subscription underneath (state, lastEventId, close). */
  readonly subscription: Subscription;
  /** Resolves once every stream's state is complete the first time. */
  readonly ready: Promise<void>;

  constructor(
    urls: string[],
    private readonly multi: boolean,
    private readonly options: LiveOptions,
  ) {
    this.ready = new Promise((resolve) => (this.resolveReady = resolve));
    let url: string;
    if (multi) {
      const base = typeof location !== "undefined" ? location.href : undefined;
      const parsed = urls.map((u) => new URL(u, base));
      const origin = parsed[0]?.origin;
      if (!origin || parsed.some((p) => p.origin !== origin)) throw new Error("streamgate: liveCollection([…]) needs streams of one server");
      for (const p of parsed) this.states.set(p.pathname, new StreamState());
      url = `${origin}/_streams?streams=${parsed.map((p) => p.pathname).join(",")}`;
    } else {
      const single = new URL(urls[0], typeof location !== "undefined" ? location.href : undefined);
      if (options.view && !single.pathname.endsWith(".json")) single.pathname += ".json";
      url = single.href;
      this.states.set("", new StreamState());
    }
    this.subscription = subscribe(url, { ...options, snapshot: !options.view, transport: "sse" });
    const sub = this.subscription;
    sub.on("message", (m: StreamEvent) => this.message(m));
    sub.on("state", (s: StateChange) => this.state(s));
    sub.on("reset", (r: ResetInfo) => this.emit("reset", r));
    sub.on("failure", (f: FailureInfo) => this.emit("failure", f));
    sub.on("close", (c: unknown) => this.emit("close", c));
  }

  /** The current state (the same object `data` listeners get). */
  get value(): S {
    if (!this.multi) return this.states.get("")!.docs as S;
    const all = new Map<string, Map<string, Doc>>();
    for (const [stream, state] of this.states) all.set(stream, state.docs);
    return all as S;
  }

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof LiveEvents<S> & string>(type: K, listener: (value: LiveEvents<S>[K]) => void): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set!.delete(listener);
  }

  /** Stops listening. */
  close(): void {
    this.subscription.close();
  }

  private emit(type: string, value: unknown): void {
    for (const listener of [...(this.listeners.get(type) ?? [])]) {
      try {
        listener(value);
      } catch (error) {
        reportListenerError(error, this.options.onListenerError);
      }
    }
  }

  private state(change: StateChange): void {
    // A connection that starts from nowhere starts every snapshot afresh: drop half-built ones.
    if (change.state === "open" && change.resumedFrom === "") for (const s of this.states.values()) s.pending = undefined;
    this.emit("state", change);
  }

  private message(m: StreamEvent): void {
    const key = this.multi ? m.stream : "";
    if (key === undefined) return;
    const s = this.states.get(key);
    if (!s) return;
    let changed = false;
    switch (m.event) {
      case "snapshot":
        s.pending ??= new Map();
        applyChange(s.pending, m.data);
        return;
      case "ready":
        s.docs = s.pending ?? new Map();
        s.pending = undefined;
        s.complete = true;
        changed = true;
        break;
      case "change":
        if (!s.complete && !this.options.view) {
          // `ready` always comes before changes: the server did not take `snapshot=true`.
          s.complete = true;
          s.docs = s.pending ?? new Map();
          s.pending = undefined;
          this.emit("incomplete", { ...(this.multi ? { stream: key } : {}), message: "the server sent changes without a snapshot (snapshot=true unsupported): only documents changed from now on are known" });
        }
        changed = applyChange(s.pending ?? s.docs, m.data) && !s.pending;
        break;
      case "put":
      case "patch":
        changed = applyView(s.docs, m.event, m.data);
        if (m.event === "put" && m.data?.path === "/") s.complete = true;
        changed = changed && s.complete;
        break;
      default:
        return;
    }
    if (!changed) return;
    if ([...this.states.values()].every((x) => x.complete)) {
      this.resolveReady();
      this.emit("data", this.value);
    }
  }
}

/**
 * A live `Map` of a stream's documents (`liveCollection(url)`), or of several streams over one
 * connection (`liveCollection([urlA, urlB])`: a `Map` from stream path to its documents).
 */
export function liveCollection(url: string, options?: LiveOptions): LiveCollection<Map<string, Doc>>;
export function liveCollection(urls: string[], options?: LiveOptions): LiveCollection<Map<string, Map<string, Doc>>>;
export function liveCollection(url: string | string[], options: LiveOptions = {}): LiveCollection<any> {
  if (Array.isArray(url)) {
    if (options.view) throw new Error("streamgate: the document view serves one stream per connection");
    return new LiveCollection(url, true, options);
  }
  return new LiveCollection([url], false, options);
}

/**
 * Streamgate client: MongoDB change streams over SSE / NDJSON, for browsers and Node >= 18.
 *
 * - `subscribe(url, options)`: events with resume, backoff with jitter, token refresh and the
 *   protocol's terminal events handled (see `subscribe.ts`).
 * - `liveCollection(url | urls, options)`: a live `Map` of documents (see `live.ts`).
 * - `applyChange`, `applyView`, `idKey`: the folding functions, for custom state.
 */

export { subscribe, Subscription } from "./subscribe.js";
export type {
  CloseInfo,
  ConnectionState,
  FailureInfo,
  ResetInfo,
  StateChange,
  StreamEvent,
  SubscribeOptions,
  SubscriptionEvents,
  TokenRequest,
  Transport,
} from "./subscribe.js";
export { liveCollection, LiveCollection } from "./live.js";
export type { LiveEvents, LiveOptions } from "./live.js";
export { applyChange, applyUpdateDescription, applyView, idKey } from "./state.js";
export type { Doc } from "./state.js";
export { NdjsonParser, SseParser } from "./parse.js";
export type { ParserSink, RawFrame } from "./parse.js";

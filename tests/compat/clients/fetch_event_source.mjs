// @microsoft/fetch-event-source: SSE over fetch with headers. It resends Last-Event-ID itself;
// reconnecting after the server closes is the app's decision (onclose throws to retry), and
// a fresh token goes in through its `fetch` option.
import { fetchEventSource } from "@microsoft/fetch-event-source";
import { BASE, PATH, Changes, token } from "./common.mjs";

// Written for browsers: it calls window.setTimeout / window.clearTimeout even in Node.
globalThis.window ??= globalThis;

const changes = new Changes();
class Retry extends Error {}
await fetchEventSource(`${BASE}${PATH}?snapshot=true`, {
  openWhenHidden: true,
  fetch: (input, init) => {
    changes.connects++;
    const t = token();
    const headers = { ...init.headers, ...(t ? { Authorization: `Bearer ${t}` } : {}) };
    return fetch(input, { ...init, headers });
  },
  onmessage(event) {
    if (!event.data) return;
    if (changes.apply(event.event, event.id, JSON.parse(event.data))) changes.final();
  },
  onclose() {
    throw new Retry("closed by the server: reconnect");
  },
  onerror() {
    return 500; // retry (ms) for every error, with Last-Event-ID
  },
});

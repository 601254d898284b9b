// npm `eventsource` (the WHATWG EventSource for Node): reconnects by itself with Last-Event-ID
// and honours `retry:`. Headers (a token) only through its `fetch` option, called on every
// (re)connect, so a fresh token each time.
import { EventSource } from "eventsource";
import { BASE, PATH, Changes, token } from "./common.mjs";

const changes = new Changes();
const source = new EventSource(`${BASE}${PATH}?snapshot=true`, {
  fetch: async (input, init) => {
    changes.connects++;
    const t = token();
    const response = await fetch(input, { ...init, headers: { ...init.headers, ...(t ? { Authorization: `Bearer ${t}` } : {}) } });
    if (!response.ok) process.stderr.write(`eventsource: ${response.status} ${await response.clone().text()}\n`);
    return response;
  },
});
// A connection error the client will not retry (a non-200 answer, say) ends it.
source.onerror = (event) => process.stderr.write(`eventsource: ${event.message ?? "error"} (${event.code ?? "-"}), readyState ${source.readyState}\n`);
for (const name of ["snapshot", "ready", "change", "cancel", "auth_revoked", "error", "invalidate"]) {
  source.addEventListener(name, (event) => {
    // `error` is also the name of EventSource's own connection-error event (no data).
    if (name === "error" && !event.data) return;
    if (changes.apply(name, event.lastEventId, JSON.parse(event.data))) changes.final();
  });
}

// NDJSON over Node's fetch with a line reader: one envelope per line, an empty line as
// keep-alive; reconnects with Last-Event-ID and a fresh token after a drop.
import { BASE, PATH, Changes, token, sleep } from "./common.mjs";

const changes = new Changes();
for (;;) {
  changes.connects++;
  const headers = { Accept: "application/x-ndjson" };
  if (changes.lastId) headers["Last-Event-ID"] = changes.lastId;
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  try {
    const response = await fetch(`${BASE}${PATH}?snapshot=true`, { headers });
    if (response.ok) {
      const decoder = new TextDecoder();
      let buffer = "";
      for await (const chunk of response.body) {
        buffer += decoder.decode(chunk, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (!line) continue;
          const envelope = JSON.parse(line);
          if (changes.apply(envelope.event, envelope.id, envelope.data)) changes.final();
        }
      }
    }
  } catch {
    // The connection dropped (the server was killed): reconnect below.
  }
  await sleep(500);
}

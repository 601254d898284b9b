// npm `ws`: the WebSocket transport, one envelope per text message. No resume of its own: the
// loop reconnects with Last-Event-ID (a header `ws` can send) and a fresh token.
import WebSocket from "ws";
import { BASE, PATH, Changes, token, sleep } from "./common.mjs";

const changes = new Changes();
const url = `${BASE.replace("http://", "ws://")}${PATH}?snapshot=true`;
for (;;) {
  changes.connects++;
  const headers = {};
  if (changes.lastId) headers["Last-Event-ID"] = changes.lastId;
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  await new Promise((resolve) => {
    const ws = new WebSocket(url, { headers });
    ws.on("message", (text) => {
      const envelope = JSON.parse(text);
      if (changes.apply(envelope.event, envelope.id, envelope.data)) changes.final();
    });
    ws.on("error", () => {});
    ws.on("close", resolve);
  });
  await sleep(500);
}

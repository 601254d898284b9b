// RESTHeart's conventions over WebSocket (npm `ws`), the way RESTHeart's docs connect: the
// stream's `$var`s bound with ?avars={...}, resume ids in RESTHeart's {"_data": "..."} form,
// sent as ?lastEventId= (a browser WebSocket cannot send headers).
import WebSocket from "ws";
import { BASE, PATH, Changes, token, sleep } from "./common.mjs";

const changes = new Changes();
const avars = process.env.SG_AVARS;
for (;;) {
  changes.connects++;
  const query = new URLSearchParams({ avars, snapshot: "true" });
  if (changes.lastId) query.set("lastEventId", JSON.stringify({ _data: changes.lastId }));
  const t = token();
  if (t) query.set("access_token", t);
  await new Promise((resolve) => {
    const ws = new WebSocket(`${BASE.replace("http://", "ws://")}${PATH}?${query}`);
    ws.on("message", (text) => {
      const envelope = JSON.parse(text);
      if (changes.apply(envelope.event, envelope.id, envelope.data)) changes.final();
    });
    ws.on("error", () => {});
    ws.on("close", resolve);
  });
  await sleep(500);
}

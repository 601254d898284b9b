// The README's examples, type-checked against the generated declarations (`npm test` runs
// `tsc -p test/types`): a change of the public types that breaks them fails the build.
import { liveCollection, subscribe, type Doc, type StreamEvent } from "../../dist/index.js";

declare function cachedToken(): string;
declare function refreshToken(): Promise<string>;
declare function render(...docs: unknown[]): void;

const url = "https://sg.example.com/shop/orders/_streams/all";
const sub = subscribe(url, {
  lastEventId: "",
  snapshotOnHistoryLost: true,
  getToken: async ({ reason }) => (reason === "connect" ? cachedToken() : refreshToken()),
});
sub.on("change", ({ id, data }: StreamEvent) => console.log(id, data.operationType));
sub.on("state", ({ state }) => console.log(state satisfies string));
sub.on("reset", (r) => console.log(r.reason, r.snapshot));
sub.on("close", ({ reason }) => console.log(reason));
sub.close();

const live = liveCollection(url, { view: true });
live.on("data", (docs: Map<string, Doc>) => render([...docs.values()]));
live.on("reset", () => render());
void live.ready.then(() => live.close());

const many = liveCollection([url, "https://sg.example.com/shop/users/_streams/active"]);
many.on("data", (byStream: Map<string, Map<string, Doc>>) => render(byStream.get("/shop/orders/_streams/all")));
subscribe(url, { transport: "ndjson" }).close();

// Opens a real EventSource in headless Debian Chromium and reports what the page receives.
//
// Usage: node eventsource.mjs <origin> <stream path>
// Prints one JSON line per event on stdout: {"type":"open"} | {"type":"change","id":…,"seq":…,
// "stream":… (on /_streams)}
// | {"type":"error-event","data":…}. Runs until killed (the Rust test owns its lifetime), or
// 120 s at most so it can never outlive a broken test.
import { launch, say } from "./chromium.mjs";

const [origin, path] = process.argv.slice(2);

const browser = await launch();
const page = await browser.newPage();
await page.exposeFunction("report", say);
await page.goto(`${origin}/health/live`);
await page.evaluate((path) => {
  const source = new EventSource(path);
  source.onopen = () => window.report({ type: "open" });
  source.addEventListener("change", (e) => {
    const data = JSON.parse(e.data);
    // `/_streams` (many streams): the data is the envelope naming the stream.
    const change = data.stream ? data.data : data;
    window.report({ type: "change", id: e.lastEventId, seq: change.fullDocument.seq,
                    stream: data.stream });
  });
  source.addEventListener("error", (e) => {
    if (e.data) window.report({ type: "error-event", data: JSON.parse(e.data) });
  });
}, path);
setTimeout(async () => { await browser.close(); process.exit(0); }, 120_000);

// Drives the operator console (/_admin/ui) in headless Debian Chromium, as an operator would:
// defines a stream with a deliberate error and reads the API's message next to the field,
// fixes it, tails the new stream live, then deletes it.
//
// Usage: node console.mjs <origin> <admin token> <db>
// Prints one JSON line per step: field-error {text}, created {path}, tailing, tail {text},
// deleted. The test (tests/it/ops.rs) inserts a document after `tailing`.
// With STREAMGATE_SCREENSHOTS=<dir>, saves console-error.png and console-live.png there.
import { launch, say } from "./chromium.mjs";

const [origin, token, db] = process.argv.slice(2);
const shots = process.env.STREAMGATE_SCREENSHOTS;
const path = `/${db}/orders/_streams/fresh`;
const STEP = { timeout: 30_000 };

const browser = await launch();
let page;
try {
  page = await browser.newPage({ viewport: { width: 1360, height: 1000 } });
  page.on("dialog", (dialog) => dialog.accept());
  page.on("pageerror", (error) => { say({ type: "page-error", text: String(error) }); });
  // The token arrives as ?access_token= once; the page keeps it for its API calls and tail.
  await page.goto(`${origin}/_admin/ui?access_token=${encodeURIComponent(token)}`);
  await page.waitForSelector("#conn:text-matches('^live')", STEP);

  // 1. A definition MongoDB cannot run: the API's 400 names pipeline[0].$out.
  await page.fill("#f-db", db);
  await page.fill("#f-coll", "orders");
  await page.fill("#f-name", "fresh");
  await page.fill("#f-description", "new orders");
  await page.fill("#f-pipeline", '[{"$out": "elsewhere"}]');
  await page.click("#f-submit");
  const error = page.locator('.field-error[data-for="pipeline"]');
  await error.filter({ hasText: "$out" }).waitFor(STEP);
  say({ type: "field-error", text: await error.textContent() });
  if (shots) await page.screenshot({ path: `${shots}/console-error.png`, fullPage: true });

  // 2. Fixed: created, listed.
  await page.fill("#f-pipeline", '[{"$match": {"operationType": "insert"}}]');
  await page.click("#f-submit");
  await page.locator("#form-status").filter({ hasText: "created" }).waitFor(STEP);
  const row = page.locator(`tr[data-path="${path}"]`);
  await row.waitFor(STEP);
  say({ type: "created", path: await row.getAttribute("data-path") });

  // 3. Live tail from the row's button; the test inserts once we say so.
  await row.locator("button.tail").click();
  await page.locator("#tail-status").filter({ hasText: "tailing" }).waitFor(STEP);
  say({ type: "tailing" });
  const change = page.locator('#tail-log li[data-kind="change"]').first();
  await change.waitFor(STEP);
  say({ type: "tail", text: await change.textContent() });
  // Let one poll show the client and the event rate before the screenshot.
  await page.locator(`tr[data-path="${path}"] td:nth-child(4)`).filter({ hasText: /^1$/ }).waitFor(STEP);
  if (shots) await page.screenshot({ path: `${shots}/console-live.png`, fullPage: true });

  // 4. Delete (the confirm dialog is accepted): the row goes.
  await row.locator("button.delete").click();
  await page.locator("#form-status").filter({ hasText: "deleted" }).waitFor(STEP);
  await row.waitFor({ state: "detached", ...STEP });
  say({ type: "deleted" });
} catch (error) {
  const status = await page?.locator("#form-status").textContent().catch(() => "");
  say({ type: "failed", text: String(error), status });
  process.exitCode = 1;
} finally {
  await browser.close();
}

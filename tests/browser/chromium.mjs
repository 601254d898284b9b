// What every browser script shares: Debian's Chromium, headless, never a downloaded browser,
// and one JSON line per report on stdout (the Rust test reads them).
import { chromium } from "playwright-core";

/** Launches Debian's Chromium (or $CHROMIUM) headless. */
export const launch = () =>
  chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });

/** Prints one report as a JSON line. */
export const say = (value) => process.stdout.write(JSON.stringify(value) + "\n");

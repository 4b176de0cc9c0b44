// The example page in headless Chromium, on the installed package: serves
// the project (serve.mjs, 127.0.0.1), loads index.html, waits for
// `#status[data-done]`, checks that bob decrypted alice's message and that
// both sides showed the same emoji, in the page and in the Web Worker,
// saves a screenshot, and exits non-zero on any failure.
//
//   node browser-check.mjs [screenshot.png]
// Chromium: $CHROMIUM or /usr/bin/chromium (playwright-core drives it; it
// downloads no browser).
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { serve } from "./serve.mjs";

const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
if (!existsSync(executablePath)) {
  console.error(`browser-check: no Chromium at ${executablePath} (scripts/test-browser.sh installs it; or set CHROMIUM)`);
  process.exit(1);
}
const screenshot = process.argv[2] ?? "example.png";
const root = fileURLToPath(new URL(".", import.meta.url));
const server = await serve(root, 0);
const url = `http://127.0.0.1:${server.address().port}/index.html`;

const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  page.on("console", (m) => console.log(`  [page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`  [page error] ${e.message}`));
  const started = Date.now();
  await page.goto(url);
  await page.waitForSelector("#status[data-done]", { timeout: 180_000 });
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  await page.screenshot({ path: screenshot, fullPage: true });
  const shown = await page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    const list = (id) => [...document.querySelectorAll(`#${id} li`)].map((li) => li.textContent);
    const side = (where) => ({
      text: text(`${where}-text`),
      alice: list(`${where}-alice-emoji`),
      bob: list(`${where}-bob-emoji`),
      verified: text(`${where}-verified`),
      reopen: text(`${where}-reopen`),
    });
    return {
      done: document.getElementById("status").dataset.done,
      status: text("status"),
      page: side("page"),
      worker: side("worker"),
    };
  });
  assert.equal(shown.done, "ok", `the page reports: ${shown.status}`);
  for (const where of ["page", "worker"]) {
    const s = shown[where];
    assert.equal(s.text, "hello bob, from a browser", `${where}: decrypted text`);
    assert.equal(s.alice.length, 7, `${where}: seven emoji`);
    assert.deepEqual(s.alice, s.bob, `${where}: both sides show the same emoji`);
    assert.match(s.verified, /alice: Done, trusts bob's device: LocallyVerified; bob: Done, trusts alice's device: LocallyVerified/);
    assert.equal(s.reopen, "wrong passphrase: WrongKey; same identity keys: true; still trusts bob: LocallyVerified");
    console.log(`browser-check (${where}): "${s.text}", emoji ${s.alice.join(" | ")}`);
  }
  console.log(`browser-check: passed in ${seconds} s; screenshot ${screenshot}`);
} catch (e) {
  failed = true;
  console.error(`browser-check: FAILED: ${e.message}`);
} finally {
  await browser.close();
  server.close();
}
process.exit(failed ? 1 : 0);

// Drives Sluice's review page in headless Chromium (Debian's, through playwright-core) as a reviewer would.
//
//   node review_page.cjs BASE_URL JOB TOKEN KEYS [SCREENSHOT]
//
// Signs in through the page's login form with TOKEN, then presses each key of
// KEYS (comma-separated, e.g. "Enter,2,Enter,u") on the current item, waiting
// after each for the page's answer. Prints one JSON line per key: the item it
// acted on, the answer (the model's, or the label the digit picks), and the
// progress text after. With KEYS "time:N" it accepts N items and prints how
// long that took. SCREENSHOT, if given, is a PNG of the page at the end. A
// last line tells how the page fits a phone's screen (390 px wide).
// Needs SLUICE_CHROMIUM (the browser) and NODE_PATH holding playwright-core.
const { chromium } = require("playwright-core");

async function main() {
  const [base, job, token, keys, screenshot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.SLUICE_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Without these, Chromium reaches for Google's hosts at start (this
    // machine's network refuses them) and needs a sandbox root lacks.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
    const first = await page.goto(`${base}/review/${job}`);
    if (first.status() !== 401 || !(await page.locator("form input#token").count())) {
      throw new Error(`expected the login form (401), got ${first.status()}`);
    }
    await page.fill("#token", token);
    await Promise.all([page.waitForURL(`**/review/${job}`), page.click("button[type=submit]")]);
    await page.waitForSelector("article.item:not([hidden])");
    const progress = () => page.locator("#progress").innerText();
    const current = () =>
      page.evaluate(() => {
        const el = document.querySelector("article.item:not([hidden])");
        if (!el) return null;
        return { id: el.dataset.id, answer: el.dataset.answer,
                 labels: [...el.querySelectorAll("button[data-label]")].map((b) => b.dataset.label) };
      });
    if (keys.startsWith("time:")) {
      const n = parseInt(keys.slice(5), 10);
      const started = Date.now();
      for (let i = 0; i < n; i++) {
        const before = await page.locator("#progress").getAttribute("data-done");
        await page.keyboard.press("Enter");
        await page.waitForFunction((b) => document.getElementById("progress").dataset.done !== b, before);
      }
      const ms = Date.now() - started;
      console.log(JSON.stringify({ decisions: n, ms, ms_per_decision: ms / n, progress: await progress() }));
    } else {
      for (const key of keys.split(",")) {
        const item = await current();
        const before = await page.locator("#progress").getAttribute("data-done");
        let answer = item && item.answer;
        if (/^[1-9]$/.test(key)) answer = item.labels[parseInt(key, 10) - 1];
        if (key === "u") answer = null;
        await page.keyboard.press(key);
        await page.waitForFunction((b) => document.getElementById("progress").dataset.done !== b, before);
        const after = await current();
        console.log(JSON.stringify({ key, id: key === "u" ? after.id : item.id, answer, progress: await progress(),
                                     message: await page.locator("#msg").innerText() }));
      }
    }
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: false });
    // The same page on a phone's screen: nothing wider than it, the buttons
    // on it.
    await page.setViewportSize({ width: 390, height: 844 });
    const phone = await page.evaluate(() => {
      const el = document.querySelector("article.item:not([hidden])") || document.getElementById("finished");
      const buttons = [...el.querySelectorAll("button")].map((b) => b.getBoundingClientRect());
      return { width: innerWidth, scroll_width: document.documentElement.scrollWidth,
               buttons: buttons.length, buttons_inside: buttons.every((r) => r.left >= 0 && r.right <= innerWidth) };
    });
    console.log(JSON.stringify({ phone }));
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});

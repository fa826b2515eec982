// End-to-end tests of the web interface in headless Chromium against the real
// binary: the widget on host pages, the agent console, the admin pages.
// Run with `scripts/e2e` (or `node --test tests/e2e/` after `npm ci` in web/).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:http";
import { gunzipSync } from "node:zlib";
import { join } from "node:path";
import {
  ANSWERS,
  ARTIFACTS,
  adminLogin,
  agentLogin,
  launchBrowser,
  percentile,
  startHostSite,
  startProxy,
  startServer,
  widget,
  widgetSend,
} from "./helpers.mjs";

let server;
let browser;
let host;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
  host = await startHostSite();
});

after(async () => {
  await browser?.close();
  await host?.close();
  await server?.stop();
});

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

async function visitorPage({ viewport = DESKTOP, locale = "en-US", url } = {}) {
  const context = await browser.newContext({ viewport, locale, isMobile: viewport === PHONE, hasTouch: viewport === PHONE });
  const page = await context.newPage();
  await page.goto(url ?? `${server.base}/demo`);
  return page;
}

async function openWidget(page) {
  await widget(page).locator("button.fab").click();
  await widget(page).locator("textarea").waitFor();
}

function get(path, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = request(`${server.base}${path}`, { headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on("error", reject);
    req.end();
  });
}

test("widget.js is small, compressed, and cached as its URL requires", async () => {
  const gz = await get("/widget.js", { "Accept-Encoding": "gzip" });
  assert.equal(gz.status, 200);
  assert.equal(gz.headers["content-encoding"], "gzip");
  assert.equal(gz.headers["vary"], "Accept-Encoding");
  assert.match(gz.headers["cache-control"], /max-age=300/);
  const js = gunzipSync(gz.body).toString();
  assert.match(js, /switchboard/);
  console.log(
    `# widget.js transferred with gzip: ${gz.body.length} bytes (${(gz.body.length / 1024).toFixed(1)} KiB); identity ${Buffer.byteLength(js)} bytes`,
  );
  assert.ok(gz.body.length <= 30 * 1024, "widget gzip size target: <= 30 KB");

  const br = await get("/widget.js", { "Accept-Encoding": "gzip, br" });
  assert.equal(br.headers["content-encoding"], "br");
  const again = await get("/widget.js", { "If-None-Match": gz.headers.etag });
  assert.equal(again.status, 304);

  const console_ = (await get("/console")).body.toString();
  const asset = /src="(\/assets\/[^"]+)"/.exec(console_)[1];
  const hashed = await get(asset, { "Accept-Encoding": "br" });
  assert.equal(hashed.status, 200);
  assert.equal(hashed.headers["cache-control"], "public, max-age=31536000, immutable");
  assert.equal((await get("/assets/not-there.js")).status, 404);
});

test("a visitor asks a knowledge-base question on the sample bank page and sees the bot's answer", async () => {
  const page = await visitorPage();
  await openWidget(page);
  await widgetSend(page, "I am still waiting on my card, when will it arrive?");
  const answer = widget(page).locator(".m.bot .b").last();
  await answer.waitFor({ timeout: 20000 });
  assert.equal(await answer.textContent(), ANSWERS.card_arrival);
  // The visitor's own message is acked.
  await widget(page).locator(".m.me[data-state=sent], .m.me[data-state=read]").first().waitFor();
  await page.screenshot({ path: join(ARTIFACTS, "widget-desktop-en.png") });
  await page.context().close();
});

test("the visitor asks for a human; an agent accepts in the console and replies; read state updates", async () => {
  const agent = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  await agentLogin(agent, server.base);
  // Away, so the conversation waits in the queue instead of being assigned at once.
  await agent.getByLabel("Presence").selectOption("away");

  const visitor = await visitorPage();
  await openWidget(visitor);
  await widgetSend(visitor, "Hello, something odd happened with my account");
  await widget(visitor).locator(".m.me[data-state=sent]").first().waitFor();
  await widget(visitor).getByRole("button", { name: "Talk to a human" }).click();
  // The only agent is away: the server says nobody is online (`no_agents`) and the widget
  // invites the visitor to leave a message, which is stored and waits in the queue.
  await widget(visitor).locator(".status.info").filter({ hasText: "Leave a message" }).waitFor();
  await visitor.screenshot({ path: join(ARTIFACTS, "widget-no-agents-en.png") });
  await widgetSend(visitor, "Please call me back about it");
  await widget(visitor).locator(".m.me[data-state=sent]").nth(1).waitFor();

  const queued = agent.locator(".queue li[data-conversation]");
  await queued.first().waitFor();
  assert.match(await queued.first().textContent(), /waiting \d+:\d\d/);
  await agent.screenshot({ path: join(ARTIFACTS, "console-queue.png") });
  await queued.first().getByRole("button", { name: "Accept" }).click();
  const mine = agent.locator(".mine li[data-conversation]");
  await mine.first().waitFor();
  // The history: the visitor's message and the bot's earlier answer, marked.
  await agent.locator(".chat-log .msg.visitor").filter({ hasText: "something odd" }).waitFor();
  await agent.locator(".chat-log .msg.visitor").filter({ hasText: "call me back" }).waitFor();
  await agent.locator(".chat-log .msg.bot").first().waitFor();

  // The visitor is told, sees the agent typing and then the reply.
  await widget(visitor).locator(".m.sys").filter({ hasText: "Alice joined" }).waitFor();
  await agent.locator("textarea.reply").pressSequentially("Hi, I'm Al", { delay: 20 });
  await widget(visitor).locator(".typing:not([hidden])").waitFor();
  await agent.locator("textarea.reply").fill("Hi, I'm Alice. Let me look into it.");
  await agent.locator("textarea.reply").press("Enter");
  const reply = widget(visitor).locator(".m.agent .b");
  await reply.waitFor();
  assert.equal(await reply.textContent(), "Hi, I'm Alice. Let me look into it.");
  // The widget is open, so the visitor has read it: the console shows "read".
  await agent.locator(".msg.mine[data-state=read]").waitFor();
  // And the agent read the visitor's message: the widget shows "Read".
  await widget(visitor).locator(".m.me[data-state=read]").first().waitFor();

  // Canned replies: "/" opens the searchable list.
  await agent.locator("textarea.reply").fill("/anything else");
  await agent.locator(".canned li").first().waitFor();
  await agent.screenshot({ path: join(ARTIFACTS, "console.png") });
  await agent.locator("textarea.reply").press("Enter");
  assert.equal(await agent.locator("textarea.reply").inputValue(), "Is there anything else I can help you with?");
  await agent.locator("textarea.reply").fill("");

  // Latency: visitor presses Enter → the console shows the message.
  await agent.evaluate(() => {
    const arrivals = (window.__arrivals = {});
    new MutationObserver((records) => {
      const now = performance.timeOrigin + performance.now();
      for (const r of records)
        for (const node of r.addedNodes)
          if (node.classList?.contains("visitor")) arrivals[node.querySelector(".text").textContent] ??= now;
    }).observe(document.querySelector(".chat-log-holder"), { childList: true, subtree: true });
  });
  const latencies = [];
  for (let i = 0; i < 25; i++) {
    const text = `latency probe ${i}`;
    const sentAt = await visitor.evaluate((text) => {
      const root = document.querySelector("#switchboard-widget").shadowRoot;
      const input = root.querySelector("textarea");
      input.value = text;
      const at = performance.timeOrigin + performance.now();
      input.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
      return at;
    }, text);
    const arrivedAt = await agent.waitForFunction((text) => window.__arrivals[text], text, { polling: 5 });
    latencies.push((await arrivedAt.jsonValue()) - sentAt);
  }
  const p50 = percentile(latencies, 0.5);
  console.log(
    `# visitor message → console: p50 ${p50.toFixed(1)} ms, p90 ${percentile(latencies, 0.9).toFixed(1)} ms, max ${Math.max(...latencies).toFixed(1)} ms over ${latencies.length} messages`,
  );
  assert.equal(await agent.locator(".chat-log .msg.visitor").filter({ hasText: "latency probe" }).count(), 25);

  // Close the conversation; the visitor is told.
  await agent.getByRole("button", { name: "Close" }).click();
  await widget(visitor).locator(".m.sys").filter({ hasText: "ended" }).waitFor();
  // Writing again starts a new conversation (seqs start over) and the bot answers in it.
  await widgetSend(visitor, "How do I unblock my PIN?");
  await widget(visitor).locator(".m.bot .b", { hasText: ANSWERS.pin_blocked }).waitFor({ timeout: 20000 });
  await agent.context().close();
  await visitor.context().close();
});

test("messages typed while the network is down arrive exactly once after the reconnect", async () => {
  const proxy = await startProxy(server.port);
  const site = "drop-test";
  const page = await visitorPage({ url: `${host.origin}/host.html?widget=${proxy.origin}&site=${site}` });
  await openWidget(page);
  await widgetSend(page, "before the drop");
  await widget(page).locator(".m.me[data-state=sent]").first().waitFor();

  // An ack lost in flight: the server stores the message, the widget never hears back.
  proxy.swallowDown();
  await widgetSend(page, "in flight when the line died");
  await page.waitForTimeout(700);
  proxy.drop();
  await widget(page).locator(".status.warn").waitFor();
  const offline = ["typed offline one", "typed offline two", "typed offline three"];
  for (const text of offline) await widgetSend(page, text);
  assert.equal(await widget(page).locator(".m.me[data-state=sending]").count(), 4);
  await page.waitForTimeout(1500);
  proxy.restore();

  const all = ["before the drop", "in flight when the line died", ...offline];
  await page.waitForFunction(
    (n) => document.querySelector("#switchboard-widget").shadowRoot.querySelectorAll(".m.me[data-state=sent], .m.me[data-state=read]").length === n,
    all.length,
    { timeout: 30000 },
  );
  // The widget shows each message once ...
  for (const text of all) assert.equal(await widget(page).locator(".m.me .b", { hasText: text }).count(), 1, text);
  // ... and the server stored each once: replay the whole conversation on a fresh socket.
  const stored = await page.evaluate(
    async ({ base, site }) => {
      const saved = JSON.parse(localStorage.getItem("switchboard.visitor." + site));
      const url = new URL("/ws/visitor", base);
      url.protocol = "ws:";
      url.search = new URLSearchParams({ site, visitor: saved.visitor, ...(saved.secret ? { secret: saved.secret } : {}), resume: "0" });
      const ws = new WebSocket(url);
      const texts = [];
      await new Promise((resolve) => {
        ws.onmessage = (e) => {
          const frame = JSON.parse(e.data);
          if (frame.type === "message" && frame.from === "visitor") texts.push(frame.text);
        };
        setTimeout(resolve, 1500);
      });
      ws.close();
      return texts;
    },
    { base: server.base, site },
  );
  for (const text of all) assert.equal(stored.filter((t) => t === text).length, 1, `stored once: ${text}`);
  assert.equal(stored.length, all.length);
  await page.context().close();
  await proxy.close();
});

test("the widget renders on a host page with hostile CSS", async () => {
  const page = await visitorPage({ url: `${host.origin}/hostile.html?widget=${server.base}&site=hostile` });
  const fab = widget(page).locator("button.fab");
  await fab.waitFor();
  const box = await fab.boundingBox();
  assert.ok(box && Math.abs(box.width - 56) < 1 && Math.abs(box.height - 56) < 1, `button is 56 px: ${JSON.stringify(box)}`);
  assert.ok(box.x + box.width <= DESKTOP.width && box.y + box.height <= DESKTOP.height, "button is on screen");
  await fab.click();
  const panel = widget(page).locator(".panel");
  const panelBox = await panel.boundingBox();
  assert.ok(panelBox && Math.abs(panelBox.width - 360) < 1, `panel is 360 px wide: ${JSON.stringify(panelBox)}`);
  await widgetSend(page, "How do I unblock my PIN?");
  const answer = widget(page).locator(".m.bot .b").last();
  await answer.waitFor({ timeout: 20000 });
  const style = await answer.evaluate((node) => {
    const s = getComputedStyle(node);
    return { fontSize: s.fontSize, color: s.color, display: s.display };
  });
  assert.deepEqual(style, { fontSize: "14px", color: "rgb(28, 36, 48)", display: "block" });
  await page.screenshot({ path: join(ARTIFACTS, "widget-hostile-css.png") });
  await page.context().close();
});

test("screenshots: phone and desktop, English and Chinese; keyboard only", async () => {
  for (const [viewport, label] of [
    [PHONE, "phone"],
    [DESKTOP, "desktop"],
  ]) {
    for (const locale of ["en-US", "zh-CN"]) {
      const page = await visitorPage({ viewport, locale });
      // Keyboard only: Tab to the button (after the page's own links), Enter opens, typing and Enter send.
      for (let i = 0; i < 10; i++) {
        await page.keyboard.press("Tab");
        if (await page.evaluate(() => document.activeElement?.id === "switchboard-widget")) break;
      }
      await page.keyboard.press("Enter");
      await widget(page).locator(".panel:not([hidden])").waitFor();
      await page.keyboard.type(locale === "zh-CN" ? "My card has not arrived yet" : "My card still hasn't arrived");
      await page.keyboard.press("Enter");
      await widget(page).locator(".m.bot").last().waitFor({ timeout: 20000 });
      const button = await widget(page).locator("button.human").textContent();
      assert.equal(button, locale === "zh-CN" ? "转人工客服" : "Talk to a human");
      if (viewport === PHONE) {
        const box = await widget(page).locator(".panel").boundingBox();
        assert.equal(Math.round(box.width), PHONE.width, "the panel fills a phone's width");
      }
      const file = `widget-${label}-${locale === "zh-CN" ? "zh" : "en"}.png`;
      if (!(label === "desktop" && locale === "en-US")) await page.screenshot({ path: join(ARTIFACTS, file) });
      // Esc closes and gives focus back to the button.
      await page.keyboard.press("Escape");
      await widget(page).locator(".panel[hidden]").waitFor({ state: "attached" });
      await page.context().close();
    }
  }
});

test("the admin pages log in, render, and name the endpoints they lack", async () => {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 1000 } })).newPage();
  await adminLogin(page, server.base);
  // /metrics exists today: the charts fill in.
  await page.locator("#metrics .chart .value").filter({ hasText: /\d/ }).first().waitFor();
  await page.waitForTimeout(6500);
  for (const id of ["agents", "kb", "audit", "metrics"]) await page.locator(`#${id}`).waitFor();
  // Panels whose endpoint is missing say so instead of staying blank.
  const agentsError = await page.locator("#agents .error").textContent();
  if (agentsError) assert.match(agentsError, /\/api\/agents|forbidden|unauthorized|\d{3}/i);
  await page.getByLabel("Try a question").fill("my card has not arrived");
  await page.getByRole("button", { name: "Try" }).click();
  await page.waitForFunction(
    () => document.querySelector("#kb .try-result")?.textContent || document.querySelector("#kb .error")?.textContent,
  );
  await page.screenshot({ path: join(ARTIFACTS, "admin.png"), fullPage: true });
  await page.context().close();
});

// End-to-end tests of the web interface in headless Chromium against the real
// binary: the widget on host pages, the agent console, the admin pages.
// Run with `scripts/e2e` (or `node --test tests/e2e/` after `npm ci` in web/).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:http";
import { gunzipSync } from "node:zlib";
import { join } from "node:path";
import {
  AGENTS,
  ANSWERS,
  ARTIFACTS,
  adminLogin,
  agentLogin,
  launchBrowser,
  percentile,
  startHostSite,
  startProxy,
  smallKb,
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

  // The host's next page (here: a reload) keeps the visitor (localStorage) and shows the
  // conversation so far again, each message once.
  const visitor = await page.evaluate(() => JSON.parse(localStorage.getItem("switchboard.visitor.demo-bank") ?? "{}"));
  await page.reload();
  await openWidget(page);
  await widget(page).locator(".m.bot .b", { hasText: ANSWERS.card_arrival }).waitFor();
  assert.equal(await widget(page).locator(".m.me .b", { hasText: "still waiting on my card" }).count(), 1);
  assert.equal(await widget(page).locator(".m.bot .b").count(), 1);
  const after = await page.evaluate(() => JSON.parse(localStorage.getItem("switchboard.visitor.demo-bank") ?? "{}"));
  assert.ok(visitor.visitor && visitor.secret, "visitor id and secret in localStorage");
  assert.equal(after.visitor, visitor.visitor);
  await page.context().close();
});

test("the visitor asks for a human; an agent accepts in the console and replies; read state updates", async () => {
  const agent = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  await agentLogin(agent, server.base);
  // A canned reply for the whole team (Alice is an admin), stored on the server; the console
  // loads the team's replies when it starts, so reload it.
  const created = await agent.evaluate(async () => {
    const { token } = JSON.parse(sessionStorage.getItem("switchboard.session"));
    const body = { title: "Team welcome", text: "Welcome! A colleague will be with you shortly.", shortcut: "teamhello" };
    const r = await fetch("/api/canned", {
      method: "POST",
      headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return r.status;
  });
  assert.equal(created, 201);
  await agent.reload();
  await agent.getByLabel("Presence").waitFor();
  // Away, so the conversation waits in the queue instead of being assigned at once.
  await agent.getByLabel("Presence").selectOption("away");

  const visitor = await visitorPage();
  await openWidget(visitor);
  await widgetSend(visitor, "Hello, something odd happened with my account");
  await widget(visitor).locator(".m.me[data-state=sent]").first().waitFor();
  // The bot answers first (the agent's history shows that answer below); asking for a human
  // before the answer arrived would drop it, and the test would race the model.
  await widget(visitor).locator(".m.bot .b").first().waitFor({ timeout: 20000 });
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

  // The agent sees the visitor typing.
  // At once: the typing throttle's interval may still run from before the agent joined.
  await widget(visitor).locator("textarea").pressSequentially("one more thi", { delay: 20 });
  await agent.locator(".typing:not([hidden])").filter({ hasText: "Visitor is typing" }).waitFor();
  await widget(visitor).locator("textarea").fill("");

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
  // The team's canned replies (GET /api/canned) are there too, found by their shortcut.
  await agent.locator("textarea.reply").fill("/teamhello");
  await agent.locator(".canned li").first().waitFor();
  await agent.locator("textarea.reply").press("Enter");
  assert.equal(await agent.locator("textarea.reply").inputValue(), "Welcome! A colleague will be with you shortly.");
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

/**
 * A console page whose beeps (oscillators started) and browser notifications are counted,
 * and whose `document.hidden` the test sets (headless Chromium is never hidden).
 */
async function spiedConsole(agentName) {
  const context = await browser.newContext({ viewport: DESKTOP, permissions: ["notifications"] });
  await context.addInitScript(() => {
    window.__oscillators = 0;
    window.__notifications = [];
    window.__hidden = false;
    Object.defineProperty(Document.prototype, "hidden", { get: () => window.__hidden, configurable: true });
    const create = AudioContext.prototype.createOscillator;
    AudioContext.prototype.createOscillator = function () {
      window.__oscillators++;
      return create.call(this);
    };
    const Real = window.Notification;
    window.Notification = class extends Real {
      constructor(title, options) {
        window.__notifications.push({ title, body: options?.body });
        super(title, options);
      }
    };
    Object.defineProperty(window.Notification, "permission", { get: () => Real.permission });
  });
  const page = await context.newPage();
  await agentLogin(page, server.base, agentName);
  return page;
}

/** A visitor on the bank page who gets a bot answer, then asks for a human. */
async function visitorAsksForHuman(question, answer) {
  const page = await visitorPage();
  await openWidget(page);
  await widgetSend(page, question);
  await widget(page).locator(".m.bot .b", { hasText: answer }).waitFor({ timeout: 20000 });
  await widget(page).getByRole("button", { name: "Talk to a human" }).click();
  return page;
}

test("console: a new conversation beeps and notifies; unread counts; transfer to another agent", async () => {
  const alice = await spiedConsole("alice");
  assert.equal(await alice.evaluate(() => Notification.permission), "granted");

  const first = await visitorAsksForHuman("How do I unblock my PIN?", ANSWERS.pin_blocked);
  await widget(first).locator(".m.sys").filter({ hasText: "Alice joined" }).waitFor();
  await alice.locator(".mine li[data-conversation].active").waitFor();
  assert.ok((await alice.evaluate(() => window.__oscillators)) > 0, "a new conversation beeps");
  // The page is visible: no browser notification.
  assert.equal(await alice.evaluate(() => window.__notifications.length), 0);

  // In a background tab the console notifies too.
  await alice.evaluate(() => {
    window.__hidden = true;
    window.__oscillators = 0;
  });
  const second = await visitorAsksForHuman("Which exchange rate do you use?", ANSWERS.exchange_rate);
  await widget(second).locator(".m.sys").filter({ hasText: "Alice joined" }).waitFor();
  await alice.waitForFunction(() => window.__notifications.length > 0);
  const [note] = await alice.evaluate(() => window.__notifications);
  assert.match(note.body, /^New conversation #\d+$/);
  assert.ok((await alice.evaluate(() => window.__oscillators)) > 0, "and beeps");
  await alice.evaluate(() => (window.__hidden = false));

  // The second conversation is not the one open: its messages count as unread.
  const other = alice.locator(".mine li[data-conversation]:not(.active)");
  const badge = other.locator(".unread");
  await badge.waitFor();
  const before = Number(await badge.textContent());
  assert.ok(before >= 1, `unread after the history: ${before}`);
  await widgetSend(second, "Are you there?");
  await alice.waitForFunction(
    (n) => Number(document.querySelector(".mine li[data-conversation]:not(.active) .unread")?.textContent) === n + 1,
    before,
  );
  assert.equal(await badge.getAttribute("aria-label"), `${before + 1} unread`);
  await alice.screenshot({ path: join(ARTIFACTS, "console-unread.png") });
  const secondId = await other.getAttribute("data-conversation");
  await other.locator("button.open-conv").click();
  await alice.locator(`.mine li[data-conversation="${secondId}"].active`).waitFor();
  assert.equal(await alice.locator(`.mine li[data-conversation="${secondId}"] .unread`).count(), 0);
  // Opening it is reading it: the visitor sees "Read".
  await widget(second).locator(".m.me[data-state=read]").last().waitFor();

  // Transfer to Bob: he gets it with its history, the visitor is told, Alice no longer holds it.
  const bob = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  await agentLogin(bob, server.base, "bob");
  await alice.getByLabel("Transfer to agent").fill("bob");
  await alice.getByRole("button", { name: "Transfer" }).click();
  await alice.locator(".chat-log .msg.system").filter({ hasText: "Transferred to bob" }).waitFor();
  assert.equal(await alice.locator(`.mine li[data-conversation="${secondId}"]`).count(), 0);
  await bob.locator(`.mine li[data-conversation="${secondId}"]`).waitFor();
  await bob.locator(".chat-log .msg.visitor").filter({ hasText: "Are you there?" }).waitFor();
  await widget(second).locator(".m.sys").filter({ hasText: "Bob joined" }).waitFor();
  await bob.locator("textarea.reply").fill("Bob here, I have your question.");
  await bob.locator("textarea.reply").press("Enter");
  await widget(second).locator(".m.agent .b", { hasText: "Bob here" }).waitFor();

  // Close both, so later tests start with no open conversations.
  await bob.getByRole("button", { name: "Close" }).click();
  await widget(second).locator(".m.sys").filter({ hasText: "ended" }).waitFor();
  await alice.locator(".mine li[data-conversation] button.open-conv").first().click();
  await alice.getByRole("button", { name: "Close" }).click();
  await widget(first).locator(".m.sys").filter({ hasText: "ended" }).waitFor();
  for (const page of [alice, bob, first, second]) await page.context().close();
});

test("a visitor waiting behind a full agent sees the queue position, and it moves up", async () => {
  // Carol takes one conversation at most.
  const carol = await (await browser.newContext({ viewport: DESKTOP })).newPage();
  await agentLogin(carol, server.base, "carol");
  const served = await visitorAsksForHuman("How do I unblock my PIN?", ANSWERS.pin_blocked);
  await widget(served).locator(".m.sys").filter({ hasText: "Carol joined" }).waitFor();

  const position = async (page) => {
    const status = widget(page).locator(".status.info").filter({ hasText: /You are number \d+ in the queue/ });
    await status.waitFor();
    return Number(/number (\d+)/.exec(await status.textContent())[1]);
  };
  const next = await visitorAsksForHuman("Which exchange rate do you use?", ANSWERS.exchange_rate);
  const nextAt = await position(next);
  const last = await visitorAsksForHuman("I lost my card, what do I do?", ANSWERS.lost_or_stolen_card);
  const lastQueuedAt = Date.now();
  await widget(last).locator(".status.info").filter({ hasText: `number ${nextAt + 1} in the queue` }).waitFor();
  // No "nobody online" invitation: an agent is online, only busy.
  assert.equal(await widget(last).locator(".status.leave").count(), 0);
  await last.screenshot({ path: join(ARTIFACTS, "widget-queued-en.png") });
  // The console shows both waiting.
  await carol.locator(".queue li[data-conversation]").nth(1).waitFor();

  // Carol closes the first: the next visitor is assigned, the last moves up one.
  await carol.getByRole("button", { name: "Close" }).click();
  await widget(served).locator(".m.sys").filter({ hasText: "ended" }).waitFor();
  // Earlier tests closed their conversations: these two are the whole queue.
  assert.equal(nextAt, 1);
  await widget(next).locator(".m.sys").filter({ hasText: "Carol joined" }).waitFor();
  await widget(last).locator(".status.info").filter({ hasText: "number 1 in the queue" }).waitFor();

  // A reloaded console shows how long the visitor has really waited (the server's time, not
  // since the page saw it) and the whole history of the conversation it holds.
  await carol.waitForTimeout(Math.max(0, 2500 - (Date.now() - lastQueuedAt)));
  await carol.reload();
  await carol.locator(".conn.ok").waitFor();
  const wait = await carol.locator(".queue li[data-conversation] .wait").first().textContent();
  const [, minutes, seconds] = /waiting (\d+):(\d\d)/.exec(wait);
  assert.ok(Number(minutes) * 60 + Number(seconds) >= 2, `waited since the visitor asked: ${wait}`);
  await carol.locator(".chat-log .msg.visitor").filter({ hasText: "Which exchange rate" }).waitFor();
  await carol.locator(".chat-log .msg.bot").filter({ hasText: ANSWERS.exchange_rate }).waitFor();
  assert.equal(await carol.locator(".mine .unread").count(), 0, "history read before the reload is not unread");
  for (const page of [carol, served, next, last]) await page.context().close();
});

test("data-lang picks the widget's language over the browser's", async () => {
  const page = await visitorPage({ url: `${host.origin}/host.html?widget=${server.base}&site=lang-test&lang=zh-CN` });
  await openWidget(page);
  assert.equal(await widget(page).locator("button.human").textContent(), "转人工客服");
  assert.equal(await widget(page).locator(".sb").getAttribute("lang"), "zh-CN");
  await page.context().close();
  const english = await visitorPage({ locale: "zh-CN", url: `${host.origin}/host.html?widget=${server.base}&site=lang-test&lang=en` });
  await openWidget(english);
  assert.equal(await widget(english).locator("button.human").textContent(), "Talk to a human");
  await english.context().close();
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
      // The focused button shows a visible focus ring.
      const ring = await widget(page)
        .locator("button.fab")
        .evaluate((node) => ({ focused: node.matches(":focus-visible"), style: getComputedStyle(node).outlineStyle }));
      assert.deepEqual(ring, { focused: true, style: "solid" });
      await page.keyboard.press("Enter");
      await widget(page).locator(".panel:not([hidden])").waitFor();
      // Focus moves into the panel's text box.
      assert.equal(await widget(page).locator("textarea").evaluate((node) => node === node.getRootNode().activeElement), true);
      await page.keyboard.type(locale === "zh-CN" ? "My card has not arrived yet" : "My card still hasn't arrived");
      await page.keyboard.press("Enter");
      await widget(page).locator(".m.bot").last().waitFor({ timeout: 20000 });
      // Tab from the text box reaches the send button, Shift+Tab the "talk to a human" button.
      await page.keyboard.press("Tab");
      assert.equal(await widget(page).locator("button.send").evaluate((node) => node === node.getRootNode().activeElement), true);
      await page.keyboard.press("Shift+Tab");
      await page.keyboard.press("Shift+Tab");
      assert.equal(await widget(page).locator("button.human").evaluate((node) => node === node.getRootNode().activeElement), true);
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

test("the admin pages: agents and roles, knowledge base search, try and import, live charts, audit log", async () => {
  // Some traffic for the charts (stored messages, a bot answer), also when run alone.
  const visitor = await visitorPage();
  await openWidget(visitor);
  await widgetSend(visitor, "How do I unblock my PIN?");
  await widget(visitor).locator(".m.bot .b", { hasText: ANSWERS.pin_blocked }).waitFor({ timeout: 20000 });

  const page = await (await browser.newContext({ viewport: { width: 1280, height: 1000 } })).newPage();
  await adminLogin(page, server.base);

  // Agents and roles: the accounts made with `switchboard agent add`, each with its role.
  const rows = page.locator("#agents tbody tr");
  await rows.nth(2).waitFor();
  for (const agent of Object.values(AGENTS)) {
    const row = rows.filter({ hasText: agent.display });
    assert.equal(await row.locator("select").inputValue(), agent.role, agent.name);
  }
  // Add one, then change its role: both go through the API and show after a reload of the list.
  await page.getByLabel("New agent name").fill("dave");
  await page.getByLabel("New agent password").fill("dave-password-0123");
  await page.locator("#agents form select").selectOption("supervisor");
  await page.getByRole("button", { name: "Add agent" }).click();
  const dave = rows.filter({ hasText: "dave" });
  await dave.waitFor();
  assert.equal(await page.getByLabel("New agent password").inputValue(), "", "the form is cleared");
  assert.equal(await dave.locator("select").inputValue(), "supervisor");
  await dave.locator("select").selectOption("agent");
  await page.waitForFunction(async () => {
    const { token } = JSON.parse(sessionStorage.getItem("switchboard.session"));
    const r = await fetch("/api/agents", { headers: { Authorization: "Bearer " + token } });
    const body = await r.json();
    return (body.agents ?? body).find((a) => a.name === "dave")?.role === "agent";
  });
  assert.equal(await page.locator("#agents .error").textContent(), "");

  // Knowledge base: search shows entries with their intent and answer.
  await page.getByLabel("Search the knowledge base").fill("card");
  await page.getByRole("button", { name: "Search" }).click();
  const result = page.locator("#kb .results li").filter({ hasText: ANSWERS.card_arrival }).first();
  await result.waitFor();
  assert.equal(await result.locator(".intent").textContent(), "card_arrival");

  // Try a question: the recognised intent and its confidence.
  await page.getByLabel("Try a question").fill("my card has not arrived");
  await page.getByRole("button", { name: "Try" }).click();
  const tried = page.locator("#kb .try-result");
  await tried.filter({ hasText: "Intent:" }).waitFor();
  const text = await tried.textContent();
  assert.match(text, /Intent: card_arrival/);
  const confidence = Number(/Confidence: ([0-9.]+)/.exec(text)[1]);
  assert.ok(confidence > 0.45 && confidence <= 1, `confidence ${confidence}`);
  assert.ok(text.includes("Answer: " + ANSWERS.card_arrival), text);

  // Import: the same knowledge base again, as a file; the server reports the new version.
  await page.getByLabel("Knowledge base file").setInputFiles({ name: "kb.csv", mimeType: "text/csv", buffer: Buffer.from(smallKb()) });
  await page.getByRole("button", { name: "Import" }).click();
  await page.locator("#kb .import-result").filter({ hasText: "Imported" }).waitFor({ timeout: 60000 });
  assert.match(await page.locator("#kb .import-result").textContent(), /^Imported version \d+: 5 entries, 60 questions/);
  assert.equal(await page.locator("#kb .error").textContent(), "");

  // Live charts: the four series from /metrics all have a value after a few polls.
  await page.waitForTimeout(4500);
  const charts = await page.locator("#metrics figure.chart").evaluateAll((figures) =>
    figures.map((f) => ({ title: f.querySelector("figcaption span").textContent, value: f.querySelector(".value").textContent, points: f.querySelector("polyline").getAttribute("points") })),
  );
  assert.deepEqual(
    charts.map((c) => c.title),
    ["Sessions open", "Messages/s", "Message latency p99 (to commit)", "Bot cache hit ratio"],
  );
  for (const chart of charts) {
    assert.match(chart.value, /^[0-9.]+(\/s| ms|%)?$/, `${chart.title}: ${chart.value}`);
    assert.ok(chart.points, `${chart.title} draws a line`);
  }
  assert.ok(Number.parseFloat(charts[2].value) > 0, "latency p99 from the histogram");
  assert.equal(await page.locator("#metrics .error").textContent(), "");

  await page.screenshot({ path: join(ARTIFACTS, "admin.png"), fullPage: true });

  // The audit log, refreshed after each change: logins, the account made above, the role
  // change, the import.
  await page.locator("#audit .audit-list li").filter({ hasText: "kb_imported" }).nth(1).waitFor();
  const audit = await page.locator("#audit .audit-list").textContent();
  for (const kind of ["login", "account_created", "role_changed", "kb_imported"]) assert.match(audit, new RegExp(kind), kind);
  assert.match(audit, /dave/);
  await page.locator("#audit .audit-list li").last().scrollIntoViewIfNeeded();
  await page.screenshot({ path: join(ARTIFACTS, "admin-audit.png"), fullPage: true });
  await page.context().close();
  await visitor.context().close();
});

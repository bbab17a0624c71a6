// The developer portal end to end in headless Chromium (playwright-core, Debian's chromium).
// Run by cli/tests/portal_e2e.rs against a real `aihub admin` and `aihub gateway`; standalone:
//
//   PORTAL_URL=http://127.0.0.1:8081 GATEWAY_URL=http://127.0.0.1:8080/v1 MAIL_DIR=data/mail \
//   CHROMIUM=/usr/bin/chromium SCREENSHOT_DIR=/tmp/shots node e2e/portal.spec.mjs
//
// Covers, through the browser as a developer would:
//  1. register → verification mail (file transport) → the mail's link → confirm → log in
//  2. create a key with a limit; shown once; copy button → clipboard; never in the list's HTML
//  3. a chat completion through the gateway with the copied key (Node fetch)
//  4. its request, tokens and cost on the dashboard and the usage page (metering → ClickHouse)
//  4b. tasks: queue a batch generation from the Tasks page; its row runs and completes live
//     (server-sent events, no reload); the result downloads as JSONL
//  5. revoke (confirm dialog) → the gateway refuses the key with an OpenAI-shaped 401
//  5b. webhooks: add an endpoint (a receiver in this script), secret shown once; a test event
//     arrives signed, and the open events page shows it live (server-sent events, no reload)
//  6. CSRF: POSTs without, with a wrong, or cross-site with the right token are refused (403)
//  7. the 中文 / English switch
//  8. phone width (375×812): dashboard, keys, usage, billing, quick-start — full-page
//     screenshots, no horizontal overflow
//  9. no console errors, page errors or CSP violations on any page
// Exits non-zero on the first failure, with a screenshot of the page (failed-step-N.png).

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
}
const PORTAL = env('PORTAL_URL').replace(/\/$/, '');
const GATEWAY = env('GATEWAY_URL').replace(/\/$/, '');
const MAIL_DIR = env('MAIL_DIR');
const CHROMIUM = env('CHROMIUM');
const SHOTS = env('SCREENSHOT_DIR');

const MODEL = 'gpt-4o-mini';
// A model whose upstream answers after a few seconds: a task on it is seen running, then done.
const SLOW_MODEL = process.env.SLOW_MODEL || 'slow-model';
const EMAIL = `browser-${Date.now()}@example.com`;
const PASSWORD = 'a long enough e2e password';
const KEY_NAME = 'e2e browser key';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- console errors, page errors and CSP violations, on every page -------------------------
const problems = [];
function watch(page, label) {
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const at = m.location()?.url ? ` (${m.location().url})` : '';
    problems.push(`${label} ${page.url()}: console: ${m.text()}${at}`);
  });
  page.on('pageerror', (e) => problems.push(`${label} ${page.url()}: page error: ${e.message}`));
}
async function newContext(browser, options) {
  const ctx = await browser.newContext({ locale: 'en-US', ...options });
  // Injected by the browser, not the page: not subject to the page's own policy.
  await ctx.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) =>
      console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`));
  });
  return ctx;
}

// ---- steps: a line each, a screenshot when one fails ---------------------------------------
let current; // the page a failure screenshot shows
let stepNo = 0;
async function step(title, fn) {
  stepNo += 1;
  const t0 = Date.now();
  console.log(`[${stepNo}] ${title}`);
  try {
    await fn();
  } catch (e) {
    const file = path.join(SHOTS, `failed-step-${stepNo}.png`);
    await current?.screenshot({ path: file, fullPage: true }).then(
      () => console.log(`    FAILED at ${current.url()}; screenshot ${file}`),
      () => {},
    );
    throw e;
  }
  console.log(`    ok (${Date.now() - t0} ms)`);
}

// ---- helpers -------------------------------------------------------------------------------
async function open(page, pathAndQuery, status = 200) {
  const resp = await page.goto(PORTAL + pathAndQuery);
  assert.equal(resp.status(), status, `GET ${pathAndQuery}`);
  return resp;
}

/** Clicks `selector` and waits for the page it leads to; returns that page's response. */
async function submit(page, selector) {
  const [resp] = await Promise.all([page.waitForNavigation(), page.click(selector)]);
  return resp;
}

const text = async (page, selector) => (await page.locator(selector).innerText()).trim();
const number = (s) => Number(s.replace(/[$,\s]/g, ''));

/** A mail's text body, decoded from its transfer encoding. */
function mailBody(raw) {
  const split = raw.search(/\r?\n\r?\n/);
  const head = raw.slice(0, split);
  const body = raw.slice(split).trim();
  const cte = /^content-transfer-encoding:\s*(\S+)/im.exec(head)?.[1].toLowerCase();
  if (cte === 'base64') return Buffer.from(body.replace(/\s+/g, ''), 'base64').toString('utf8');
  if (cte === 'quoted-printable') {
    const bytes = body.replace(/=\r?\n/g, '').replace(/=([0-9A-F]{2})/gi, (_, h) =>
      String.fromCharCode(parseInt(h, 16)));
    return Buffer.from(bytes, 'latin1').toString('utf8');
  }
  return body;
}

/** The `/portal/verify-email?token=…` path in the newest mail to `to`. */
async function verificationPath(to) {
  for (let i = 0; i < 200; i++) {
    for (const name of await readdir(MAIL_DIR)) {
      const raw = await readFile(path.join(MAIL_DIR, name), 'utf8');
      if (!new RegExp(`^To: .*${to.replace(/[.+]/g, '\\$&')}`, 'mi').test(raw)) continue;
      const m = mailBody(raw).match(/\/portal\/verify-email\?token=[A-Za-z0-9_\-.~%]+/);
      if (m) return m[0];
    }
    await sleep(50);
  }
  throw new Error(`no verification mail to ${to} in ${MAIL_DIR}`);
}

function chat(key) {
  return fetch(`${GATEWAY}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'Hello from the browser test' }] }),
  });
}

/** Reloads `url` until `read(page)` satisfies `ok` (metering arrives in batches). */
async function poll(page, url, read, ok, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    await open(page, url);
    const got = await read(page);
    if (ok(got)) return got;
    if (Date.now() > deadline) assert.fail(`${url} still shows ${JSON.stringify(got)}`);
    await sleep(500);
  }
}

/** The document's width against the viewport's, and the first elements sticking out. */
const overflow = (page) => page.evaluate(() => {
  const vw = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('body *')]
    .filter((e) => e.getBoundingClientRect().right > vw + 0.5 && !e.parentElement.closest('.scroll, pre'))
    .slice(0, 5)
    .map((e) => `${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}${e.className ? '.' + String(e.className).trim().replace(/\s+/g, '.') : ''}`);
  return { scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, wide };
});

// ---- the run -------------------------------------------------------------------------------
const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
try {
  const ctx = await newContext(browser, { viewport: { width: 1280, height: 900 } });
  await ctx.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: PORTAL });
  const page = await ctx.newPage();
  watch(page, 'desktop');
  current = page;
  let key, usage;

  await step('register, verify the email from the mail link, log in', async () => {
    await open(page, '/portal/register');
    await page.fill('#email', EMAIL);
    await page.fill('#password', PASSWORD);
    await page.fill('#full_name', 'Browser Test');
    const resp = await submit(page, 'form[action="/portal/register"] button[type=submit]');
    assert.equal(resp.status(), 200);
    assert.match(await text(page, '#message'), /Check your inbox/);

    const link = await verificationPath(EMAIL);
    console.log(`    mail link ${link.replace(/token=.*/, 'token=…')}`);
    await open(page, link); // the link only shows the form: a mail scanner cannot use it up
    assert.notEqual(await page.inputValue('#token'), '');
    await submit(page, '#verify');
    assert.equal(new URL(page.url()).pathname, '/portal/login');
    assert.match(await text(page, '.notice'), /Email verified/);

    await page.fill('#email', EMAIL);
    await page.fill('#password', PASSWORD);
    await submit(page, 'form[action="/portal/login"] button[type=submit]');
    assert.equal(new URL(page.url()).pathname, '/portal/dashboard');
    assert.equal(await page.locator('#logout').count(), 1, 'signed in');
  });

  await step('create a key; shown once, copied through the clipboard, never listed', async () => {
    await open(page, '/portal/keys');
    assert.equal(await page.locator('#no-keys').count(), 1);
    await page.fill('#name', KEY_NAME);
    await page.fill('#rate_limit_rpm', '600');
    const resp = await submit(page, '#create');
    assert.equal(resp.status(), 201);
    const shown = await text(page, '#new-key');
    assert.match(await page.locator('pre').first().innerText(), new RegExp(`curl ${GATEWAY}/chat/completions`));

    await page.click('#copy-key');
    await page.waitForFunction(() => document.querySelector('#copy-key').textContent === document.querySelector('#copy-key').dataset.copied);
    key = await page.evaluate(() => navigator.clipboard.readText());
    assert.equal(key, shown, 'the clipboard holds the key shown');
    assert.ok(key.startsWith('ahub_'), `key ${key.slice(0, 9)}…`);

    await open(page, '/portal/keys');
    const row = page.locator('tr[data-key-id]', { hasText: KEY_NAME });
    assert.equal(await row.count(), 1);
    const shownPrefix = await text(page, 'tr[data-key-id] code');
    assert.match(shownPrefix, /^ahub_[A-Za-z0-9_]+…$/); // one ellipsis
    assert.ok(key.startsWith(shownPrefix.slice(0, -1)), `prefix ${shownPrefix}`);
    const html = await (await page.request.get(`${PORTAL}/portal/keys?revoked=true`)).text();
    assert.ok(!(await page.content()).includes(key) && !html.includes(key), 'the full key is in the list page');
  });

  await step('a chat completion through the gateway with the copied key', async () => {
    const deadline = Date.now() + 5000;
    let resp = await chat(key);
    while (resp.status === 401 && Date.now() < deadline) { // until the gateway has synced the key
      await sleep(100);
      resp = await chat(key);
    }
    const body = await resp.json();
    assert.equal(resp.status, 200, JSON.stringify(body));
    usage = body.usage;
    assert.ok(usage.total_tokens > 0, JSON.stringify(usage));
    console.log(`    usage ${JSON.stringify(usage)}`);
  });

  await step('the request, its tokens and cost on the dashboard and the usage page', async () => {
    const dash = await poll(page, '/portal/dashboard', async (p) => ({
      labels: await p.locator('#stats .stat .label').allInnerTexts(),
      requests: await text(p, '[data-stat="1"]'),
      tokens: await text(p, '[data-stat="2"]'),
      cost: await text(p, '[data-stat="3"]'),
    }), (d) => number(d.requests) === 1);
    assert.deepEqual(dash.labels.slice(0, 3), ['Requests', 'Tokens', 'Cost so far']);
    assert.equal(number(dash.tokens), usage.total_tokens);
    assert.ok(number(dash.cost) > 0, `dashboard cost ${dash.cost}`);
    assert.equal(await page.locator('#first-call').count(), 0, 'the first-call box is gone');
    const ticks = await page.locator('svg.chart text[text-anchor=end]').allTextContents();
    assert.equal(new Set(ticks).size, 5, `distinct axis labels, got ${ticks}`);
    await page.screenshot({ path: path.join(SHOTS, 'desktop-dashboard.png'), fullPage: true });

    const use = await poll(page, '/portal/usage', async (p) => ({
      requests: await text(p, '#total-requests'),
      tokens: await text(p, '#total-tokens'),
      cost: await text(p, '#total-cost'),
    }), (u) => number(u.requests) === 1);
    assert.equal(number(use.tokens), usage.total_tokens);
    assert.equal(use.cost, dash.cost);
    assert.match(await text(page, '#by-key'), new RegExp(KEY_NAME));
    assert.match(await page.locator('table').first().innerText(), new RegExp(MODEL));
    console.log(`    dashboard ${JSON.stringify({ ...dash, labels: undefined })}; usage ${JSON.stringify(use)}`);
    await page.screenshot({ path: path.join(SHOTS, 'desktop-usage.png'), fullPage: true });
  });

  await step('tasks: a batch generation runs and completes live on the Tasks page', async () => {
    await open(page, '/portal/tasks');
    await page.fill('#create-generate #model', SLOW_MODEL);
    await page.fill('#create-generate #prompts', 'Hello\nBonjour');
    const created = await submit(page, '#create-generate #generate');
    assert.ok(created.status() < 400, `create: ${created.status()}`);
    const row = page.locator('#tasks tbody tr').first();
    assert.equal(await row.getAttribute('data-done'), 'false', 'the task is still running');
    await page.evaluate(() => { window.__noReload = true; });
    await page.waitForSelector('#tasks tbody tr:first-child [data-status="completed"]', { timeout: 30000 });
    assert.equal(await page.evaluate(() => window.__noReload), true, 'updated in place, not reloaded');
    assert.match(await row.innerText(), /100\s*%/);
    const href = await row.locator('a[href*="/result"]').first().getAttribute('href');
    const resp = await page.request.get(PORTAL + href);
    assert.equal(resp.status(), 200);
    const lines = (await resp.text()).trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(lines.map((l) => l.custom_id), ['item-1', 'item-2']);
    assert.equal(lines[0].response.status_code, 200);
    await page.screenshot({ path: path.join(SHOTS, 'desktop-tasks.png'), fullPage: true });
    console.log(`    task ${await row.getAttribute('data-task-id')} completed live; ${lines.length} result lines`);
  });

  await step('revoke the key (after a dismissed confirm); the gateway refuses it', async () => {
    await open(page, '/portal/keys');
    await page.screenshot({ path: path.join(SHOTS, 'desktop-keys.png'), fullPage: true });
    const wrap = await page.evaluate(() => {
      const w = document.querySelector('#keys').parentElement;
      return { scroll: w.scrollWidth, client: w.clientWidth };
    });
    assert.ok(wrap.scroll <= wrap.client, `the keys table fits a desktop page: ${JSON.stringify(wrap)}`);
    const revoke = page.locator('tr[data-key-id]', { hasText: KEY_NAME }).locator('button[name=revoke]');
    page.once('dialog', (d) => d.dismiss());
    await revoke.click();
    await sleep(300);
    assert.equal(new URL(page.url()).search, '', 'dismissing the confirm keeps the key');

    let asked = '';
    page.once('dialog', (d) => { asked = d.message(); d.accept(); });
    await Promise.all([page.waitForNavigation(), revoke.click()]);
    assert.match(asked, /Revoke this key/);
    assert.equal(new URL(page.url()).search, '?done=revoked');
    assert.match(await text(page, '.notice'), /Key revoked/);
    await open(page, '/portal/keys?revoked=true');
    assert.equal(await page.locator('tr[data-key-id] [data-status]').getAttribute('data-status'), 'revoked');

    const t0 = Date.now();
    let resp = await chat(key);
    while (resp.status !== 401 && Date.now() - t0 < 5000) {
      await sleep(50);
      resp = await chat(key);
    }
    const body = await resp.json();
    assert.equal(resp.status, 401, JSON.stringify(body));
    assert.equal(typeof body.error?.message, 'string', JSON.stringify(body));
    assert.equal(typeof body.error.type, 'string');
    assert.equal(body.error.code, 'invalid_api_key');
    console.log(`    refused after ${Date.now() - t0} ms: ${JSON.stringify(body)}`);
  });

  await step('webhooks: add an endpoint, a test event arrives and shows live on the events page', async () => {
    const received = [];
    const server = createServer((req, res) => {
      let body = '';
      req.on('data', (c) => { body += c; });
      req.on('end', () => { received.push({ headers: req.headers, body }); res.end('ok'); });
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    try {
      const url = `http://127.0.0.1:${server.address().port}/hook`;
      await open(page, '/portal/webhooks');
      await page.fill('#create-hook #url', url);
      await page.fill('#create-hook #event_types', 'webhook.test, api_key.*');
      const created = await submit(page, '#create-hook #create');
      assert.equal(created.status(), 201);
      const secret = (await text(page, '#new-secret'));
      assert.match(secret, /^whsec_/);
      await page.screenshot({ path: path.join(SHOTS, 'desktop-webhook-secret.png'), fullPage: true });
      await submit(page, 'a.button[href^="/portal/webhooks/whk_"]');
      const detail = page.url();
      assert.ok(!(await page.content()).includes(secret), 'the secret is shown again');

      // The events page stays open; the test is sent from a second tab.
      const events = await page.context().newPage();
      watch(events, 'events');
      await open(events, '/portal/events');
      const rows = await events.locator('#events tbody tr').count();
      await page.goto(detail);
      await submit(page, '#send-test');
      assert.match(await text(page, '.notice'), /Test event queued/);
      await events.waitForSelector('#events tbody tr.new', { timeout: 10000 });
      assert.match(await events.locator('#events tbody tr').first().innerText(), /webhook\.test/);
      assert.equal(await events.locator('#events tbody tr').count(), rows + 1);
      await events.screenshot({ path: path.join(SHOTS, 'desktop-events-live.png'), fullPage: true });
      await events.close();
      const t0 = Date.now();
      while (!received.some((r) => r.body.includes('webhook.test')) && Date.now() - t0 < 10000) await sleep(50);
      const got = received.find((r) => r.body.includes('webhook.test'));
      assert.ok(got, 'the receiver got the test event');
      assert.match(got.headers['webhook-signature'], /^v1,/);
      assert.match(got.headers['x-aihub-signature'], /^sha256=[0-9a-f]{64}$/);
      console.log(`    test event received, ${received.length} request(s); live row on the events page`);
    } finally {
      server.close();
    }
  });

  await step('CSRF: state changes without the right token are refused', async () => {
    await open(page, '/portal/keys');
    const csrf = await page.inputValue('#create-key input[name=csrf]');
    const wrong = (csrf[0] === 'A' ? 'B' : 'A') + csrf.slice(1);
    const attempts = [
      ['no token', { name: 'csrf-none' }, {}],
      ['a wrong token', { name: 'csrf-wrong', csrf: wrong }, {}],
      ['the right token, cross-site', { name: 'csrf-cross', csrf }, { 'sec-fetch-site': 'cross-site' }],
    ];
    for (const [why, form, headers] of attempts) { // page.request carries the session cookie
      const r = await page.request.post(`${PORTAL}/portal/keys`, { form, headers, maxRedirects: 0 });
      assert.equal(r.status(), 403, why);
      assert.match(await r.text(), /data-code="csrf_failed"/, why);
    }
    // The same request with the page's token works: the refusals were the token's doing.
    const ok = await page.request.post(`${PORTAL}/portal/keys`, { form: { name: 'csrf-control', csrf }, maxRedirects: 0 });
    assert.equal(ok.status(), 201);
    await open(page, '/portal/keys?revoked=true');
    const names = await page.locator('tr[data-key-id] td:first-child').allInnerTexts();
    assert.deepEqual(names.sort(), ['csrf-control', KEY_NAME].sort());
  });

  await step('switch to 中文 and back to English', async () => {
    await open(page, '/portal/keys');
    await submit(page, 'button[name=to][value=zh]');
    assert.equal(new URL(page.url()).pathname, '/portal/keys');
    assert.equal(await page.getAttribute('html', 'lang'), 'zh-CN');
    assert.equal(await text(page, 'h1'), 'API 密钥');
    assert.equal(await page.getAttribute('button[name=to][value=zh]', 'aria-pressed'), 'true');
    await page.screenshot({ path: path.join(SHOTS, 'desktop-keys-zh.png'), fullPage: true });
    await submit(page, 'button[name=to][value=en]');
    assert.equal(await page.getAttribute('html', 'lang'), 'en');
    assert.equal(await text(page, 'h1'), 'API keys');
  });

  await step('phone width: no horizontal overflow; full-page screenshots', async () => {
    const phone = await newContext(browser, {
      viewport: { width: 375, height: 812 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2,
      storageState: await ctx.storageState(),
    });
    const p = await phone.newPage();
    watch(p, 'phone');
    current = p;
    const pages = { dashboard: '/portal/dashboard', keys: '/portal/keys', usage: '/portal/usage',
      billing: '/portal/billing', quickstart: '/portal/docs/quickstart' };
    const overflowing = [];
    for (const [name, url] of Object.entries(pages)) {
      await open(p, url);
      const file = path.join(SHOTS, `phone-${name}.png`);
      await p.screenshot({ path: file, fullPage: true });
      const o = await overflow(p);
      console.log(`    ${url}: scrollWidth ${o.scrollWidth}, innerWidth ${o.innerWidth} → ${file}`);
      if (o.scrollWidth > Math.min(o.innerWidth, 375)) overflowing.push(`${url} (${o.scrollWidth} px: ${o.wide.join(', ')})`);
    }
    assert.deepEqual(overflowing, [], 'pages wider than the phone');
    await phone.close();
    current = page;
  });

  await step('no console errors, page errors or CSP violations', async () => {
    assert.deepEqual(problems, []);
  });
  console.log('portal e2e: all steps passed');
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}

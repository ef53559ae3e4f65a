// Browser test of the admin plane's approvals inbox (/ui/), in headless Chromium via playwright-core.
// Checks: sign-in with a personal token; a held call's arguments shown escaped and redacted (no XSS,
// no dialog, no CSP console error); approving with a comment moves it to "Decided"; sign-out; an
// approver of another group sees no Approve/Deny buttons; forged or missing CSRF tokens get 403.
// Run by the Rust e2e test as `node tests/browser/inbox.mjs` with ADMIN_URL, APPROVER_TOKEN (alice),
// OUTSIDER_TOKEN (bob), APPROVAL_ID, SECOND_ID and optionally SCREENSHOT_DIR, CHROMIUM (browser
// binary, default /usr/bin/chromium), TOOL (the held call's tool, default billing.refund), AGENT
// (agent name the card must show) and REDACTED_VALUE (a
// raw secret value that must appear nowhere in the page).
// Prints one line per step; exits 1 with the reason on the first failed expectation.
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => process.env[name] || (console.error(`inbox.mjs: ${name} is not set`), process.exit(2));
const [ADMIN_URL, APPROVER_TOKEN, OUTSIDER_TOKEN, APPROVAL_ID, SECOND_ID] =
  ['ADMIN_URL', 'APPROVER_TOKEN', 'OUTSIDER_TOKEN', 'APPROVAL_ID', 'SECOND_ID'].map(env);
const { SCREENSHOT_DIR, REDACTED_VALUE, AGENT } = process.env;
const TOOL = process.env.TOOL || 'billing.refund';
if (SCREENSHOT_DIR) mkdirSync(SCREENSHOT_DIR, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
    '--no-first-run', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext();
context.setDefaultTimeout(15_000);
const page = await context.newPage();

// Anything the page must never do; checked after every step.
const problems = [];
page.on('dialog', (d) => { problems.push(`page opened a dialog (${d.type()}): ${d.message()}`); d.dismiss().catch(() => {}); });
page.on('console', (m) => { if (m.type() === 'error' && /content.security.policy|\bCSP\b/i.test(m.text())) problems.push(`CSP console error: ${m.text()}`); });
page.on('pageerror', (e) => problems.push(`uncaught page error: ${e.message}`));

const path = () => new URL(page.url()).pathname;
const text = async (loc) => (await loc.innerText()).replace(/\s+/g, ' ');
const article = (id) => page.locator(`article[id="${id}"]`);
const button = (scope, name) => scope.getByRole('button', { name, exact: true });
const shot = async (name) => { if (SCREENSHOT_DIR) await page.screenshot({ path: join(SCREENSHOT_DIR, name), fullPage: true }); };
// Click a form's submit button and wait for the resulting page (POST, 303, GET) to load.
const submit = async (loc) => {
  await Promise.all([page.waitForEvent('framenavigated', { predicate: (f) => f === page.mainFrame() }), loc.click()]);
  await page.waitForLoadState('load');
};

async function signIn(token, user) {
  await page.goto(`${ADMIN_URL}/ui/`);
  assert.equal(path(), '/ui/login', 'GET /ui/ without a session should redirect to /ui/login');
  const input = page.getByLabel('Personal token');
  assert.equal(await input.getAttribute('type'), 'password', 'the "Personal token" input should be type=password');
  await input.fill(token);
  await submit(button(page, 'Sign in'));
  assert.equal(path(), '/ui/', `signing in should land on /ui/ (now at ${page.url()})`);
  assert.equal(await text(page.locator('h1')), 'Approvals', 'the inbox heading should be "Approvals"');
  assert.match(await text(page.locator('body')), new RegExp(`Signed in as ${user}\\b`), `page should say "Signed in as ${user}"`);
}

let current = 'start';
async function step(name, fn) {
  current = name;
  await fn();
  assert.deepEqual(problems, [], 'the page misbehaved');
  console.log(`ok   ${name}`);
}

let failed = false;
try {
  await step('a. /ui/ redirects to sign-in; alice signs in with her personal token', () => signIn(APPROVER_TOKEN, 'alice'));

  await step('b. pending approval shows tool, agent and escaped, redacted arguments', async () => {
    const card = article(APPROVAL_ID);
    await card.waitFor({ state: 'visible' });
    assert.ok((await text(card)).includes(TOOL), `article ${APPROVAL_ID} should name the tool ${TOOL}`);
    if (AGENT) assert.ok((await text(card)).includes(AGENT), `article ${APPROVAL_ID} should name the agent ${AGENT}`);
    const args = card.locator('pre.arguments');
    const shown = await args.textContent();
    assert.ok(shown.includes('<script>'), `arguments should show "<script>" as text, got: ${shown}`);
    assert.ok(shown.includes('[REDACTED'), `arguments should carry the redaction marker, got: ${shown}`);
    assert.equal(await args.locator('script').count(), 0, 'arguments must not contain a live <script> element');
    if (REDACTED_VALUE) assert.ok(!(await page.content()).includes(REDACTED_VALUE), 'the raw redacted value appears in the page');
    assert.equal(await page.evaluate(() => window.__xss), undefined, 'window.__xss is set: the argument ran as script');
  });

  await step('c. screenshot of the inbox', () => shot('inbox.png'));

  await step('c2. a POST with alice\'s own session but a forged CSRF token is refused with 403', async () => {
    const url = `${ADMIN_URL}/ui/approvals/${APPROVAL_ID}/approve`;
    const res = await context.request.post(url, { form: { comment: 'forged', csrf: 'forged' }, maxRedirects: 0 });
    assert.equal(res.status(), 403, `POST ${url} with a forged csrf should be 403, got ${res.status()}`);
    await page.reload();
    assert.equal(await button(article(APPROVAL_ID), 'Approve').count(), 1, `${APPROVAL_ID} must still be pending`);
  });

  await step('d. alice approves with a comment; it moves to "Decided"', async () => {
    const form = article(APPROVAL_ID).locator('form').filter({ has: button(page, 'Approve') });
    await form.getByLabel('Comment').fill('refund checked against the ticket');
    await submit(button(form, 'Approve'));
    assert.equal(path(), '/ui/', `approving should land back on /ui/ (now at ${page.url()})`);
    const decided = page.locator('section#decided');
    assert.equal(await decided.count(), 1, 'the inbox should have a section#decided');
    assert.ok((await decided.innerHTML()).includes(APPROVAL_ID), `section#decided should list ${APPROVAL_ID}`);
    assert.match(await text(decided), /approved/i, 'section#decided should say "approved"');
    assert.equal(await button(article(APPROVAL_ID), 'Approve').count(), 0, 'a decided approval should have no Approve button');
    await shot('decided.png');
  });

  await step('e. sign out; bob (another group) sees the second approval without Approve/Deny', async () => {
    await submit(button(page, 'Sign out'));
    await page.goto(`${ADMIN_URL}/ui/`);
    assert.equal(path(), '/ui/login', 'after signing out, /ui/ should redirect to /ui/login');
    await signIn(OUTSIDER_TOKEN, 'bob');
    const card = article(SECOND_ID);
    await card.waitFor({ state: 'visible' });
    for (const name of ['Approve', 'Deny']) assert.equal(await button(card, name).count(), 0, `bob should get no "${name}" button`);
    assert.match(await text(card), /not an approver/, `article ${SECOND_ID} should tell bob he is "not an approver"`);
  });

  await step('f. forged and missing CSRF tokens are refused with 403', async () => {
    const url = `${ADMIN_URL}/ui/approvals/${SECOND_ID}/approve`;
    for (const [what, form] of [['forged csrf', { comment: 'x', csrf: 'forged' }], ['no csrf', { comment: 'x' }]]) {
      const res = await context.request.post(url, { form, maxRedirects: 0 });
      assert.equal(res.status(), 403, `POST ${url} with ${what} should be 403, got ${res.status()}`);
    }
    await page.reload();
    const decided = page.locator('section#decided');
    const stillPending = (await article(SECOND_ID).count()) > 0 && !((await decided.count()) && (await decided.innerHTML()).includes(SECOND_ID));
    assert.ok(stillPending, `${SECOND_ID} must still be pending after the refused POSTs`);
  });
} catch (e) {
  failed = true;
  console.error(`FAIL ${current}\n${e.message.replace(/\x1b\[[0-9;]*m/g, '')}`);
} finally {
  await browser.close();
}
if (failed) process.exit(1);
console.log('browser test passed');

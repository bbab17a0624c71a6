import OpenAI from "openai";

// This loop does the retrying: turn the SDK's own retries off.
const client = new OpenAI({
  baseURL: process.env.AIHUB_BASE_URL,
  apiKey: process.env.AIHUB_API_KEY,
  maxRetries: 0,
  timeout: 60_000,
});

const RETRY_STATUSES = new Set([408, 429, 500, 502, 503, 504]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs call(), retrying rate limits, server errors and connection failures with
 * exponential backoff and jitter, never sooner than Retry-After. */
async function withRetries(call, { attempts = 6, baseMs = 500, capMs = 30_000 } = {}) {
  for (let attempt = 0; ; attempt++) {
    let waitMs = 0;
    let reason;
    try {
      return await call();
    } catch (err) {
      const last = attempt === attempts - 1;
      if (err instanceof OpenAI.APIConnectionError) {
        // Timeouts included (APIConnectionTimeoutError).
        if (last) throw err;
        reason = err.name;
      } else if (err instanceof OpenAI.APIError) {
        const retryable = RETRY_STATUSES.has(err.status) && err.code !== "insufficient_quota";
        if (!retryable || last) throw err;
        waitMs = 1000 * (Number(err.headers?.get("retry-after")) || 0);
        reason = `${err.status} ${err.code}`;
      } else {
        throw err;
      }
    }
    const delayMs = Math.max(waitMs, Math.min(capMs, baseMs * 2 ** attempt)) * (1 + Math.random() / 4);
    console.log(`request failed (${reason}): retrying in ${(delayMs / 1000).toFixed(1)}s`);
    await sleep(delayMs);
  }
}

for (let i = 0; i < 64; i++) {
  await withRetries(() =>
    client.chat.completions.create({
      model: "gpt-4o-mini",
      max_completion_tokens: 5,
      messages: [{ role: "user", content: `Say the number ${i}.` }],
    }),
  );
}
console.log("64 requests answered");

// A backend in another language, as the README's "Without this package" section tells it: jobs sent with
// celery-node, their progress and outcome read from the result backend (Redis), a cancel set with ioredis.
//
//   node inpaint.js plan.json   ->  {"<job id>": {"progress": [PROGRESS meta, ...], "final": <the task's meta>}}
//
// plan.json: {"broker": "redis://...", "backend": "redis://...", "protocol": 2,
//             "jobs": [{"id": "order-1", "kwargs": {"request": {...}}, "args": [], "cancel_when": "denoising"}]}
"use strict";
const fs = require("fs");
const celery = require("celery-node");
const Redis = require("ioredis");

const TERMINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function follow(redis, job, deadline) {
  const seen = [];
  let cancelled = false;
  while (Date.now() < deadline) {
    const raw = await redis.get(`celery-task-meta-${job.id}`);  // Celery's result backend key
    const meta = raw ? JSON.parse(raw) : null;
    if (meta && TERMINAL.has(meta.status)) return { progress: seen, final: meta };
    if (meta && meta.status === "PROGRESS") {
      seen.push(meta.result);  // {stage, step, total_steps, percent, eta_s, ...}
      if (job.cancel_when === meta.result.stage && !cancelled) {
        await redis.set(`inpaint:cancel:${job.id}`, "1", "EX", 86400);  // what InpaintClient.cancel sets
        cancelled = true;
      }
    }
    await sleep(100);
  }
  return { progress: seen, final: null };
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const client = celery.createClient(plan.broker, plan.backend);
  client.conf.TASK_PROTOCOL = plan.protocol || 2;
  const redis = new Redis(plan.backend);
  const out = {};
  try {
    for (const job of plan.jobs) {  // celery-node sets no headers and no kwargsrepr
      client.sendTask("inpaint", job.args || [], job.kwargs || {}, job.id);
    }
    const deadline = Date.now() + (plan.timeout_s || 120) * 1000;
    for (const job of plan.jobs) out[job.id] = await follow(redis, job, deadline);
  } finally {
    redis.disconnect();
    client.disconnect();
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((error) => { console.error(error); process.exit(1); });

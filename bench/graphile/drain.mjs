// Graphile Worker draining JOBS no-op jobs (for comparison with fusionsync's drain).
// MODE=default: Graphile Worker's defaults (concurrency 10). MODE=batched: its batching options.
import { run, makeWorkerUtils } from "graphile-worker";

const connectionString = process.env.DATABASE_URL;
const jobs = Number(process.env.JOBS || 20000);
const batched = process.env.MODE === "batched";

const utils = await makeWorkerUtils({ connectionString });
await utils.migrate();
const specs = Array.from({ length: jobs }, (_, i) => ({ identifier: "noop", payload: { i } }));
for (let i = 0; i < specs.length; i += 1000) {
  await utils.addJobs(specs.slice(i, i + 1000));
}
await utils.release();

let done = 0;
let finish;
const finished = new Promise((resolve) => (finish = resolve));
const start = process.hrtime.bigint();
const runner = await run({
  connectionString,
  concurrency: 10,
  noHandleSignals: true,
  pollInterval: 1000,
  ...(batched ? { preset: { worker: { localQueue: { size: 500 }, completeJobBatchDelay: 1, failJobBatchDelay: 1 } } } : {}),
  taskList: {
    noop: async () => {
      done += 1;
      if (done === jobs) finish();
    },
  },
});
await finished;
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
await runner.stop();
console.log(JSON.stringify({ mode: batched ? "batched" : "default", jobs, seconds, jobs_per_sec: jobs / seconds }));

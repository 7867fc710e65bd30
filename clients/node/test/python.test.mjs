// Python sandboxes through the package: eval, cancellation, timeouts, snapshot and restore.
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { SidecarError } from "../dist/index.js";
import { scratchDir, spawnSidecar } from "./support.mjs";

// Long enough that a guest loop the sidecar failed to stop would outlast every wait below.
const CALL_TIMEOUT_MS = 120_000;
let sidecar;
before(async () => {
  sidecar = await spawnSidecar({ SIDECAR_VM_CALL_TIMEOUT_MS: String(CALL_TIMEOUT_MS) });
  const runtimes = sidecar.serverInfo.capabilities.runtimes.map((r) => r.name);
  assert.ok(runtimes.includes("python"), "the Python runtime is not installed: run wasm-sidecar runtime install python");
});
after(() => sidecar.close());

test("eval returns the value, output and exceptions of Python code", async () => {
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  const ok = await sidecar.eval(vm_id, "import sys\nprint('read', sys.stdin.read())\nn = 6 * 7\nn", { stdin: "abc" });
  assert.equal(ok.status, "ok");
  assert.equal(ok.value, "42");
  assert.equal(ok.stdout, "read abc\n");
  const failed = await sidecar.eval(vm_id, "n / 0");
  assert.equal(failed.status, "error");
  assert.equal(failed.error.type, "ZeroDivisionError");
  assert.match(failed.error.traceback, /ZeroDivisionError/);
  assert.equal((await sidecar.eval(vm_id, "n + 1")).value, "43", "a stateful VM keeps its names");
});

test("a frame far larger than a pipe's chunk arrives whole", async () => {
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  const result = await sidecar.eval(vm_id, "print('é' * 300_000, end='')");
  assert.equal(result.stdout.length, 300_000);
  assert.ok(result.stdout === "é".repeat(300_000), "every two-byte character survives the chunk boundaries");
});

test("eval's timeoutMs is the sidecar's budget: -32004 names vm_call_timeout_ms", async () => {
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  await assert.rejects(sidecar.eval(vm_id, "while True: pass", { timeoutMs: 200 }), (error) => {
    assert.ok(error instanceof SidecarError);
    assert.equal(error.code, -32004);
    assert.equal(error.data.limit, "vm_call_timeout_ms");
    assert.equal(error.data.capacity, 200);
    return true;
  });
});

/** Runs an endless loop in `vm_id` that tells the host once it has started. */
function spin(vm_id, options, started) {
  sidecar.onHostCall(async (method) => {
    assert.equal(method, "started");
    started();
    return null;
  });
  return sidecar.eval(vm_id, "import sidecar\nsidecar.host_call('started', None)\nwhile True: pass", options);
}

test("aborting a request cancels the work in the sidecar", async () => {
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  const controller = new AbortController();
  await assert.rejects(spin(vm_id, { signal: controller.signal }, () => controller.abort()), { name: "AbortError" });
  // The VM runs one eval at a time: this answers only because the loop was stopped.
  const next = await sidecar.eval(vm_id, "'free'");
  assert.equal(next.value, "'free'");
  const stats = await sidecar.request("sidecar.stats", {});
  assert.equal(stats.requests_in_flight, 0);
});

test("an already aborted signal rejects without sending anything", async () => {
  const reason = new Error("not wanted");
  const before = (await sidecar.request("sidecar.stats", {})).requests_served;
  await assert.rejects(sidecar.request("ping", {}, { signal: AbortSignal.abort(reason) }), reason);
  assert.equal((await sidecar.request("sidecar.stats", {})).requests_served, before + 1, "only the first stats request");
});

test("a request's timeoutMs gives up after that long and cancels the work", async () => {
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  const timeoutMs = 1000;
  const start = performance.now();
  await assert.rejects(
    sidecar.request("vm.eval", { vm_id, code: "import sidecar\nsidecar.host_call('started', None)\nwhile True: pass" },
      { timeoutMs }),
    { name: "TimeoutError" },
  );
  const elapsed = performance.now() - start;
  assert.ok(elapsed >= timeoutMs && elapsed <= 1.3 * timeoutMs, `gave up after ${elapsed} ms`);
  assert.equal((await sidecar.eval(vm_id, "'free'")).value, "'free'");
});

test("a Python session survives snapshot and restore in another process", async (t) => {
  const path = join(scratchDir(t), "session.snap");
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  await sidecar.eval(vm_id, "answer = 41");
  const written = await sidecar.snapshot(vm_id, path);
  assert.equal(written.path, path);
  assert.ok(written.size_bytes > 0);
  assert.match(written.sha256, /^[0-9a-f]{64}$/);
  const other = await spawnSidecar();
  try {
    const restored = await other.restore(path);
    assert.deepEqual(restored.pending_host_calls, []);
    assert.equal((await other.eval(restored.vm_id, "answer + 1")).value, "42");
  } finally {
    await other.close();
  }
});

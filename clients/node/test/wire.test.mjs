// The package against the real sidecar: wasm guests, host calls both ways, errors, notifications.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { setImmediate as tick } from "node:timers/promises";

import { SidecarError } from "../dist/index.js";
import { GREETER, HELLO_COMMAND, spawnSidecar } from "./support.mjs";

const ADD = `(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))`;
let sidecar;
before(async () => {
  sidecar = await spawnSidecar();
});
after(async () => {
  assert.deepEqual(await sidecar.close(), { exitCode: 0, signal: null });
});

test("spawn runs initialize and keeps its answer", () => {
  assert.equal(sidecar.serverInfo.protocol_version, 1);
  assert.equal(sidecar.serverInfo.server.name, "wasm-sidecar");
  assert.ok(sidecar.serverInfo.capabilities.methods.includes("vm.call"));
  assert.ok(sidecar.serverInfo.limits.some((row) => row.name === "vm_call_timeout_ms"));
});

test("a guest's host.call reaches the handler with its VM, and the answer reaches the guest", async () => {
  const seen = [];
  sidecar.onHostCall(async (method, params, { vmId }) => {
    seen.push({ method, params, vmId });
    return "evening";
  });
  const module = await sidecar.loadModule({ wat: readFileSync(GREETER, "utf8") });
  assert.match(module.module_id, /^sha256:[0-9a-f]{64}$/);
  assert.ok(module.exports.some((e) => e.name === "greet" && e.kind === "func"));
  const { vm_id } = await sidecar.createVm({ module_id: module.module_id });
  const first = await sidecar.call(vm_id, "greet", { input: "Ada" });
  assert.equal(first.output, "Good evening, Ada! (greeting #1)");
  assert.deepEqual(first.results, [1]);
  const second = await sidecar.call(vm_id, "greet", { input: new TextEncoder().encode("Grace") });
  assert.equal(second.output, "Good evening, Grace! (greeting #2)");
  assert.deepEqual(seen, [
    { method: "clock.part_of_day", params: {}, vmId: vm_id },
    { method: "clock.part_of_day", params: {}, vmId: vm_id },
  ]);
  await sidecar.dispose(vm_id);
});

test("concurrent requests and host calls are matched by id in both directions", async () => {
  // Each VM's host call is answered only once every VM has asked, last asker first, so
  // answers leave in the opposite order of the questions and each must still find its guest.
  const wat = (n) => `(module (func (export "id") (result i32) i32.const ${n}))`;
  const vms = await Promise.all([0, 1, 2, 3].map(() => sidecar.createVm({ runtime: "python" })));
  const asked = [];
  let release;
  const everyoneAsked = new Promise((resolve) => (release = resolve));
  sidecar.onHostCall(async (method, params, { vmId }) => {
    asked.push(vmId);
    if (asked.length === vms.length) release();
    await everyoneAsked;
    for (let turn = asked.indexOf(vmId); turn < vms.length; turn++) await tick();
    return { vm: vmId, echo: params };
  });
  const evals = vms.map(({ vm_id }, i) =>
    sidecar.eval(vm_id, `import sidecar\nsidecar.host_call("who", {"i": ${i}})`));
  const calls = [7, 8, 9].map(async (n) => {
    const { vm_id } = await sidecar.createVm({ wat: wat(n) });
    return (await sidecar.call(vm_id, "id")).results[0];
  });
  const [answers, numbers] = await Promise.all([Promise.all(evals), Promise.all(calls)]);
  answers.forEach((answer, i) => {
    assert.equal(answer.status, "ok", JSON.stringify(answer));
    assert.equal(answer.value, `{'vm': '${vms[i].vm_id}', 'echo': {'i': ${i}}}`);
  });
  assert.deepEqual(numbers, [7, 8, 9]);
});

test("a thrown error answers the host call with a JSON-RPC error the guest sees", async () => {
  const { vm_id } = await sidecar.createVm({ runtime: "python" });
  sidecar.onHostCall(async (method) => {
    if (method === "coded") throw new SidecarError(-32050, "no clock here", { why: "test" });
    throw new Error("plain failure");
  });
  const code = (method) => `import sidecar
try:
    sidecar.host_call("${method}", {})
except sidecar.HostError as e:
    result = (e.code, e.message, e.data)
result`;
  assert.equal((await sidecar.eval(vm_id, code("coded"))).value, "(-32050, 'no clock here', {'why': 'test'})");
  assert.equal((await sidecar.eval(vm_id, code("plain"))).value, "(-32603, 'plain failure', None)");
});

test("error answers reject with SidecarError carrying code, message and data", async () => {
  await assert.rejects(sidecar.call("vm-none", "f"), (error) => {
    assert.ok(error instanceof SidecarError);
    assert.equal(error.code, -32001);
    assert.equal(error.kind, "vm_not_found");
    assert.equal(error.data.vm_id, "vm-none");
    return true;
  });
  const { vm_id } = await sidecar.createVm({ wat: ADD });
  await assert.rejects(sidecar.call(vm_id, "add", { args: [1, true] }), {
    code: -32602,
    data: { kind: "invalid_params", path: "$.args[1]" },
  });
  await assert.rejects(sidecar.request("vm.frobnicate", {}), {
    code: -32601,
    data: { kind: "method_not_found", method: "vm.frobnicate" },
  });
  await assert.rejects(sidecar.createVm({ wat: "(module" }), { code: -32005 });
  assert.deepEqual((await sidecar.call(vm_id, "add", { args: [2, 3] })).results, [5]);
});

test("notifications reach listeners: a streaming run's vm.output", async () => {
  const { vm_id } = await sidecar.createVm({ wat: HELLO_COMMAND });
  const heard = [];
  const stop = sidecar.onNotification((method, params) => heard.push({ method, params }));
  const run = await sidecar.request("vm.run", { vm_id, stream: true });
  stop();
  assert.equal(run.exit_code, 0);
  assert.equal(run.stdout, "");
  assert.deepEqual(heard.map(({ method, params }) => [method, params.vm_id, params.stream, params.data]),
    [["vm.output", vm_id, "stdout", "hello\n"]]);
});

test("a request over protocol_frame_bytes is refused here, as the sidecar would, and serving goes on", async () => {
  const small = await spawnSidecar({ SIDECAR_PROTOCOL_FRAME_BYTES: "4096" });
  try {
    const code = "x".repeat(4096);
    await assert.rejects(small.request("vm.eval", { vm_id: "vm-1", code }), (error) => {
      assert.ok(error instanceof SidecarError);
      assert.equal(error.code, -32600);
      assert.equal(error.data.limit, "protocol_frame_bytes");
      assert.equal(error.data.env, "SIDECAR_PROTOCOL_FRAME_BYTES");
      assert.equal(error.data.capacity, 4096);
      assert.ok(error.data.observed > 4096);
      return true;
    });
    assert.deepEqual(await small.request("ping"), {});
  } finally {
    await small.close();
  }
});

// The process's life as the package sees it: snapshots of wasm VMs, dispose, close, death.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { Sidecar, SidecarError, SidecarExitedError } from "../dist/index.js";
import { GREETER, scratchDir, spawnSidecar } from "./support.mjs";

test("a wasm VM's state goes to a file and resumes under a new id; dispose ends a VM", async (t) => {
  const sidecar = await spawnSidecar();
  t.after(() => sidecar.close());
  sidecar.onHostCall(() => "morning");
  const { vm_id } = await sidecar.createVm({ wat: readFileSync(GREETER, "utf8") });
  await sidecar.call(vm_id, "greet", { input: "Ada" });
  const path = join(scratchDir(t), "greeter.snap");
  await sidecar.snapshot(vm_id, path, { format: "state" });
  const restored = await sidecar.restore(path);
  assert.notEqual(restored.vm_id, vm_id);
  assert.equal((await sidecar.call(restored.vm_id, "greet", { input: "Ada" })).output, "Good morning, Ada! (greeting #2)");
  await sidecar.dispose(vm_id);
  await assert.rejects(sidecar.call(vm_id, "greet"), { code: -32001, data: { kind: "vm_not_found", vm_id } });
  const listed = await sidecar.request("vm.list", {});
  assert.deepEqual(listed.vms.map((vm) => vm.vm_id), [restored.vm_id]);
});

test("close ends the input and resolves with the exit status; later requests reject", async () => {
  const sidecar = await spawnSidecar();
  await sidecar.createVm({ runtime: "python" });
  assert.deepEqual(await sidecar.close(), { exitCode: 0, signal: null });
  await assert.rejects(sidecar.request("ping", {}), (error) => {
    assert.ok(error instanceof SidecarExitedError);
    assert.match(error.message, /exited \(code 0\) before answering ping/);
    return true;
  });
});

test("when the process dies every pending request rejects with SidecarExitedError", async () => {
  const sidecar = await spawnSidecar();
  const vms = await Promise.all([1, 2].map(() => sidecar.createVm({ runtime: "python" })));
  let asked = 0;
  sidecar.onHostCall(() => {
    if (++asked === vms.length) process.kill(sidecar.pid, "SIGKILL");
    return new Promise(() => {}); // never answered: the guests wait until the process is gone
  });
  const evals = vms.map(({ vm_id }) => sidecar.eval(vm_id, "import sidecar\nsidecar.host_call('wait', None)"));
  for (const pending of evals) {
    await assert.rejects(pending, (error) => {
      assert.ok(error instanceof SidecarExitedError && !(error instanceof SidecarError));
      assert.equal(error.signal, "SIGKILL");
      assert.match(error.message, /signal SIGKILL\) before answering vm\.eval/);
      return true;
    });
  }
  assert.deepEqual(await sidecar.exited, { exitCode: null, signal: "SIGKILL" });
  await assert.rejects(sidecar.dispose(vms[0].vm_id), SidecarExitedError);
});

test("a command that cannot run rejects spawn with the reason", async () => {
  await assert.rejects(Sidecar.spawn({ command: "/nonexistent/wasm-sidecar" }), (error) => {
    assert.ok(error instanceof SidecarExitedError);
    assert.match(error.message, /could not run \(spawn \/nonexistent\/wasm-sidecar ENOENT\) before answering initialize/);
    assert.equal(error.cause.code, "ENOENT");
    return true;
  });
});

test("a process that exits before answering initialize rejects spawn", async () => {
  await assert.rejects(Sidecar.spawn({ command: "false" }), { name: "SidecarExitedError", exitCode: 1 });
});

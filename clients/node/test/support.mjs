// What the tests share: which sidecar to run, and one spawned the same way each time.
import { existsSync } from "node:fs";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { Sidecar } from "../dist/index.js";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const VENV_SIDECAR = join(REPO, ".venv", "bin", "wasm-sidecar");

/** `WASM_SIDECAR_COMMAND`, else the repository venv's `wasm-sidecar`, else the one on PATH. */
export const COMMAND = process.env.WASM_SIDECAR_COMMAND ?? (existsSync(VENV_SIDECAR) ? VENV_SIDECAR : "wasm-sidecar");

export const GREETER = join(REPO, "examples", "guests", "greeter.wat");

/** A sidecar for one test: logs discarded unless `WASM_SIDECAR_LOGS` is set. */
export function spawnSidecar(env = {}) {
  return Sidecar.spawn({ command: COMMAND, env, stderr: process.env.WASM_SIDECAR_LOGS ? "inherit" : "ignore" });
}

/** A scratch directory removed when the test ends. */
export function scratchDir(t) {
  const dir = mkdtempSync(join(tmpdir(), "wasm-sidecar-client-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A WASI command that writes "hello\n" to stdout. */
export const HELLO_COMMAND = `(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))`;

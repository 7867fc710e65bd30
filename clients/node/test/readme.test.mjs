// The README's Node example runs as written, importing the package by its name.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { delimiter, dirname, isAbsolute, join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";

import { COMMAND, REPO } from "./support.mjs";

function readmeExample() {
  const readme = readFileSync(join(REPO, "README.md"), "utf8");
  const section = readme.slice(readme.indexOf("### From Node.js"));
  const match = section.match(/```js\n([\s\S]*?)```/);
  assert.ok(match, "README.md has a js block under 'From Node.js'");
  return match[1];
}

test("the README's example drives the sidecar through the package", async (t) => {
  // Inside the package's folder, so that `import "wasm-sidecar-client"` resolves to this package.
  const script = join(dirname(import.meta.dirname), "readme-example.tmp.mjs");
  writeFileSync(script, readmeExample());
  t.after(() => rmSync(script, { force: true }));
  // The example runs `wasm-sidecar` from PATH: put the tested one first.
  const path = isAbsolute(COMMAND) ? `${dirname(COMMAND)}${delimiter}${process.env.PATH}` : process.env.PATH;
  const env = { ...process.env, PATH: path, SIDECAR_LOG_LEVEL: "error" };
  const { stdout } = await promisify(execFile)(process.execPath, [script], { env });
  const lines = stdout.trim().split("\n");
  assert.match(lines[0], /name: 'wasm-sidecar'/);
  assert.deepEqual(lines.slice(1), ["[ 5 ]", "'evening'", "TimeoutError", "-32001 vm_not_found"]);
});

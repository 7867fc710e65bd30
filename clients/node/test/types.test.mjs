// src/protocol.ts is what scripts/generate-types.mjs makes of protocol/schema.json, and that
// script covers every method of the schema.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { SCHEMA_PATH, TYPES_PATH, render } from "../scripts/generate-types.mjs";

const schema = JSON.parse(readFileSync(SCHEMA_PATH, "utf8"));

test("the committed types match the schema (else: npm run generate)", () => {
  assert.equal(readFileSync(TYPES_PATH, "utf8"), render(schema));
});

test("every method of the schema is in a method table, every type is declared", () => {
  const text = render(schema);
  for (const method of Object.keys(schema.methods)) assert.ok(text.includes(`  ${JSON.stringify(method)}: {`), method);
  for (const name of Object.keys(schema.$defs)) assert.match(text, new RegExp(`export (interface|type) ${name}\\b`));
});

test("a change to the schema changes the types", () => {
  const changed = structuredClone(schema);
  changed.$defs.EvalParams.properties.stdin_base64 = { type: "string", contentEncoding: "base64" };
  assert.match(render(changed), /stdin_base64\?: string;/);
  assert.notEqual(render(changed), render(schema));
});

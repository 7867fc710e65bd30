// Writes src/protocol.ts, the TypeScript types of every wire method, from protocol/schema.json.
//
// The schema is generated from the sidecar's wire types (`python -m protocol.schema`), so these
// types follow the same source of truth: never edit src/protocol.ts by hand. `--check` exits 1
// when the committed file differs from what the schema gives (CI runs it, as it runs the Python
// side's `python -m protocol.schema --check`). Plain JavaScript, so it runs before any build.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const SCHEMA_PATH = join(here, "..", "..", "..", "protocol", "schema.json");
export const TYPES_PATH = join(here, "..", "src", "protocol.ts");

const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const PRIMITIVES = { string: "string", integer: "number", number: "number", boolean: "boolean", null: "null" };

function comment(text, indent) {
  if (!text) return "";
  const lines = text.split("\n").map((line) => `${indent} * ${line}`.trimEnd());
  return `${indent}/**\n${lines.join("\n")}\n${indent} */\n`;
}

// Arrays are written `Array<T>`, so a union never needs parentheses, not even nested in another.
function union(members) {
  return [...new Set(members)].join(" | ");
}

/** The TypeScript type of one JSON Schema; `indent` is the nesting of object literals. */
function typeOf(schema, indent) {
  if (schema.$ref) return schema.$ref.replace("#/$defs/", "");
  if ("const" in schema) return JSON.stringify(schema.const);
  if (schema.enum) return union(schema.enum.map((value) => JSON.stringify(value)));
  const alternatives = schema.anyOf ?? schema.oneOf;
  if (alternatives && !schema.type) return union(alternatives.map((s) => typeOf(s, indent)));
  const types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : [];
  if (types.length === 0) return "unknown";
  return union(types.map((type) => {
    if (type in PRIMITIVES) return PRIMITIVES[type];
    if (type === "array") return schema.items ? `Array<${typeOf(schema.items, indent)}>` : "unknown[]";
    if (type === "object") return objectType(schema, indent);
    throw new Error(`schema type ${JSON.stringify(type)} has no TypeScript mapping`);
  }));
}

function objectType(schema, indent) {
  const properties = Object.entries(schema.properties ?? {});
  const extra = schema.additionalProperties;
  if (properties.length === 0) {
    if (extra && typeof extra === "object") return `Record<string, ${typeOf(extra, indent)}>`;
    return extra === false ? "Record<string, never>" : "Record<string, unknown>";
  }
  const inner = `${indent}  `;
  const required = new Set(schema.required ?? []);
  const fields = properties.map(([name, property]) => {
    const key = IDENTIFIER.test(name) ? name : JSON.stringify(name);
    const optional = required.has(name) ? "" : "?";
    return `${comment(property.description, inner)}${inner}${key}${optional}: ${typeOf(property, inner)};\n`;
  });
  if (extra && typeof extra === "object") fields.push(`${inner}[key: string]: ${typeOf(extra, inner)};\n`);
  return `{\n${fields.join("")}${indent}}`;
}

function methodTable(name, doc, methods, describe) {
  const rows = methods.map(([method, entry]) =>
    `${comment(entry.summary, "  ")}  ${JSON.stringify(method)}: ${describe(entry)};\n`);
  return `${comment(doc, "")}export interface ${name} {\n${rows.join("")}}\n`;
}

/** The whole of src/protocol.ts for a parsed schema. */
export function render(schema) {
  const parts = [
    "// Generated from protocol/schema.json by scripts/generate-types.mjs: do not edit.\n" +
      "// Regenerate with `npm run generate`; `npm run check-types` fails when this file is stale.\n",
  ];
  for (const name of Object.keys(schema.$defs).sort()) {
    const def = schema.$defs[name];
    const body = typeOf({ ...def, description: undefined }, "");
    const declaration = body.startsWith("{") ? `export interface ${name} ${body}` : `export type ${name} = ${body};`;
    parts.push(`${comment(def.description, "")}${declaration}\n`);
  }
  const methods = Object.entries(schema.methods).sort(([a], [b]) => a.localeCompare(b));
  const toSidecar = methods.filter(([, e]) => e.direction === "host_to_sidecar");
  const toHost = methods.filter(([, e]) => e.direction === "sidecar_to_host");
  const params = (e) => typeOf(e.params, "  ");
  parts.push(methodTable("HostRequests", "Requests a host sends: each method's params and result.",
    toSidecar.filter(([, e]) => !e.notification), (e) => `{ params: ${params(e)}; result: ${typeOf(e.result, "  ")} }`));
  parts.push(methodTable("HostNotifications", "Notifications a host sends: each method's params.",
    toSidecar.filter(([, e]) => e.notification), (e) => `{ params: ${params(e)} }`));
  parts.push(methodTable("SidecarRequests", "Requests the sidecar sends to its host: each method's params and result.",
    toHost.filter(([, e]) => !e.notification), (e) => `{ params: ${params(e)}; result: ${typeOf(e.result, "  ")} }`));
  parts.push(methodTable("SidecarNotifications", "Notifications the sidecar sends to its host: each method's params.",
    toHost.filter(([, e]) => e.notification), (e) => `{ params: ${params(e)} }`));
  return parts.join("\n");
}

function main(argv) {
  const text = render(JSON.parse(readFileSync(SCHEMA_PATH, "utf8")));
  if (!argv.includes("--check")) {
    writeFileSync(TYPES_PATH, text);
    return 0;
  }
  let committed = null;
  try {
    committed = readFileSync(TYPES_PATH, "utf8");
  } catch {
    // a missing file is stale too
  }
  if (committed !== text) {
    console.error(`${TYPES_PATH} is out of date with ${SCHEMA_PATH}; run: npm run generate`);
    return 1;
  }
  return 0;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) process.exitCode = main(process.argv.slice(2));

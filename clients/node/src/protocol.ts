// Generated from protocol/schema.json by scripts/generate-types.mjs: do not edit.
// Regenerate with `npm run generate`; `npm run check-types` fails when this file is stale.

/**
 * Names a request of the host's still in flight; unknown or finished ids are ignored.
 */
export interface CancelParams {
  id: string | number;
}

/**
 * What this sidecar offers, so a host can adapt without probing.
 */
export interface Capabilities {
  guest_abi: number;
  methods: Array<string>;
  runtimes: Array<RuntimeInfo>;
  snapshot_formats: Array<"state" | "wasm">;
}

/**
 * Host responses to `host.call` that matched no pending call, by reason; none of them is fatal.
 */
export interface DroppedResponses {
  duplicate: number;
  stale: number;
  unmatched: number;
}

/**
 * `{}`: the params of methods that take none (an absent `params` reads as this) and empty results.
 */
export type Empty = Record<string, never>;

export interface ErrorObject {
  code: number;
  data?: unknown;
  message: string;
}

/**
 * The exception that ended the code: its type (qualified outside builtins), message, traceback.
 */
export interface EvalError {
  message: string;
  traceback: string;
  type: string;
}

/**
 * Runs `code` in the VM's interpreter; `stdin` is what the code reads from `sys.stdin`.
 */
export interface EvalParams {
  code: string;
  stdin?: string;
  /**
   * Tightens vm_call_timeout_ms for this request; it can never raise it.
   */
  timeout_ms?: number;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * `value` is the repr of a trailing expression; `exit_code` is set when the code raised `SystemExit`.
 */
export interface EvalResult {
  elapsed_ms: number;
  error?: EvalError;
  exit_code?: number;
  status: "error" | "exit" | "ok";
  stderr: string;
  stdout: string;
  value?: string;
}

/**
 * One export of a module; `params`/`results` are wasm value types and only set for functions.
 */
export interface ExportInfo {
  kind: string;
  name: string;
  params?: Array<string>;
  results?: Array<string>;
}

/**
 * A guest's request to the host; `params` is the JSON the guest passed, `null` when it passed none.
 */
export interface HostCallParams {
  method: string;
  params: unknown;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * One import of a module, as `module`.`name`; a guest may import only what the sidecar provides.
 */
export interface ImportInfo {
  kind: string;
  module: string;
  name: string;
  params?: Array<string>;
  results?: Array<string>;
}

/**
 * `protocol_version` is the version the host speaks; the result says which one the sidecar speaks.
 */
export interface InitializeParams {
  client?: PeerInfo;
  protocol_version?: number;
}

export interface InitializeResult {
  capabilities: Capabilities;
  limits: Array<LimitRow>;
  protocol_version: number;
  server: PeerInfo;
}

/**
 * One entry of the limits inventory with the value in force and where that value came from.
 *
 * `source` says who set `value`: the inventory `default`, the variable `env` (null for invariants,
 * which nothing tunes), or a `vm` override. Amounts are whole numbers of `unit`.
 */
export interface LimitRow {
  class: "guest" | "invariant" | "protocol" | "runner";
  default: number;
  env: string | null;
  name: string;
  source: "default" | "env" | "vm";
  unit: string;
  value: number;
}

export interface LimitsResult {
  limits: Array<LimitRow>;
}

/**
 * Exactly one source: a file the sidecar can read, the binary inline, or WebAssembly text.
 * With `preinit`, the module loaded is the source pre-initialized by that export (contract v1.1).
 */
export interface ModuleLoadParams {
  /**
   * A path on the sidecar's file system.
   */
  path?: string;
  preinit?: PreinitSpec;
  wasm_base64?: string;
  wat?: string;
}

/**
 * `cached` is true when the compiled module came from the compile cache instead of a compile.
 * After a `preinit`, everything describes the baked module, and `preinit_ms`/`preinit_cached` are set.
 */
export interface ModuleLoadResult {
  cached: boolean;
  compile_ms: number;
  exports: Array<ExportInfo>;
  imports: Array<ImportInfo>;
  /**
   * Content address of a module.
   */
  module_id: string;
  preinit_cached?: boolean;
  preinit_ms?: number;
  size_bytes: number;
}

/**
 * A call without an `id`: never answered, not even with an error.
 */
export interface Notification {
  jsonrpc: "2.0";
  method: string;
  params?: Record<string, unknown> | unknown[];
}

/**
 * Who is on the other end; for logs and diagnostics only, never for behaviour.
 */
export interface PeerInfo {
  name: string;
  version?: string;
}

/**
 * An async `host.call` the VM was waiting on when snapshotted; answer it by this `id`.
 */
export interface PendingHostCall {
  id: string;
  method: string;
  params: unknown;
}

/**
 * Pre-initialization: `export` (`() -> ()`, or `() -> i32` where nonzero is failure) runs once
 * with the WASI view `wasi`, and the state it leaves is baked into a new module.
 */
export interface PreinitSpec {
  export: string;
  wasi?: WasiSettings;
}

/**
 * A host directory the guest sees at `guest_path`; read-only unless `writable`.
 */
export interface Preopen {
  guest_path: string;
  /**
   * A path on the sidecar's file system.
   */
  host_path: string;
  writable?: boolean;
}

/**
 * Instances of stateless VMs closed and replaced, by reason: after `vm_recycle_after_calls`
 * calls, past `vm_recycle_memory_bytes` of retained memory, or after a trap (or timeout, cancel).
 * `rewound`: of the `calls` ones, those set back in place to a new instance's state instead (a
 * runtime's stateless VM: each eval a pristine interpreter).
 */
export interface Recycles {
  calls: number;
  memory: number;
  rewound: number;
  trap: number;
}

/**
 * A call that expects exactly one response with the same `id`.
 */
export interface Request {
  id: string | number;
  jsonrpc: "2.0";
  method: string;
  params?: Record<string, unknown> | unknown[];
}

/**
 * Exactly one of `result` and `error` is set; `id` is null only for unreadable requests.
 */
export interface Response {
  error?: ErrorObject;
  id: string | number | null;
  jsonrpc: "2.0";
  result?: unknown;
}

/**
 * A runtime this installation has: `vm.create {runtime: name}` makes VMs of it.
 */
export interface RuntimeInfo {
  name: string;
  preimported: Array<string>;
  version: string;
}

/**
 * Process-wide counters since start; `host_calls_pending` counts calls awaiting a host answer;
 * `vms_starting` the VMs being created or restored (compile included), which count against
 * `runner_vms` like live ones.
 *
 * `vm_calls`, `vm_memory_bytes` (linear memory retained by live instances) and
 * `instances_recycled` sum over the live VMs; `engines` counts the wasmtime engines kept (one
 * per engine setting in use or kept for reuse, at most `runner_engines`).
 *
 * `hibernations` and `wakes` count VMs that left memory and came back since start (a stateless
 * VM's dropped instances included); `state_bytes` is what the state directory holds (hibernated
 * VMs' state and their modules, each module once); `state_quarantined` counts state files that
 * failed validation and were moved aside. `spare_instances` counts instances made ahead for the
 * next `vm.create` of their module (at most `runner_spare_instances`), live stores outside any VM.
 */
export interface StatsResult {
  engines: number;
  hibernations: number;
  host_calls_pending: number;
  instances_recycled: Recycles;
  requests_in_flight: number;
  requests_served: number;
  responses_dropped: DroppedResponses;
  spare_instances: number;
  state_bytes: number;
  state_quarantined: number;
  uptime_ms: number;
  vm_calls: number;
  vm_memory_bytes: number;
  vms: number;
  vms_starting: number;
  wakes: number;
}

/**
 * Calls export `export`; at most one of `input` (UTF-8 text) and `input_base64`.
 */
export interface VmCallParams {
  args?: Array<number>;
  export: string;
  input?: string;
  input_base64?: string;
  /**
   * Tightens vm_call_timeout_ms for this request; it can never raise it.
   */
  timeout_ms?: number;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * The guest's output is `output` when it is valid UTF-8, `output_base64` otherwise.
 */
export interface VmCallResult {
  elapsed_ms: number;
  fuel_used?: number;
  output?: string;
  output_base64?: string;
  results: Array<number>;
}

/**
 * Exactly one of `module_id`, `path`, `wasm_base64`, `wat` names the VM's module, or `runtime` a
 * sidecar-provided guest (listed in `initialize`'s capabilities), which the sidecar pre-initializes.
 */
export interface VmCreateParams {
  /**
   * Per-VM budgets by limit name; may only tighten the sidecar's own value.
   */
  limits?: Record<string, number | string>;
  mode?: "stateful" | "stateless";
  /**
   * Content address of a module.
   */
  module_id?: string;
  /**
   * A path on the sidecar's file system.
   */
  path?: string;
  preinit?: PreinitSpec;
  runtime?: "python";
  wasi?: WasiSettings;
  wasm_base64?: string;
  wat?: string;
}

/**
 * `module_id`, `preinit_ms` and `preinit_cached` are set after a `preinit`: the VM runs the baked module.
 */
export interface VmCreateResult {
  /**
   * Content address of a module.
   */
  module_id?: string;
  preinit_cached?: boolean;
  preinit_ms?: number;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

export interface VmDisposeParams {
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

export interface VmHibernateParams {
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * One VM. `memory_bytes` sums linear memory over its live instances; `recycles` counts
 * the instances a stateless VM retired, by reason. `resident` is false for a VM that hibernated
 * (its state on disk; the next request naming it wakes it) and for a stateless one holding no
 * instance; `last_used` (RFC 3339, UTC) is when a request or a host answer last reached it.
 */
export interface VmInfo {
  calls: number;
  host_calls_pending: number;
  instances: number;
  last_used: string;
  memory_bytes: number;
  mode: "stateful" | "stateless";
  /**
   * Content address of a module.
   */
  module_id: string;
  recycles: Recycles;
  resident: boolean;
  state: "busy" | "idle";
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

export interface VmListResult {
  vms: Array<VmInfo>;
}

/**
 * A chunk of a streamed run's output: `data` when valid UTF-8, `data_base64` otherwise.
 *
 * `request_id` (extension) is the id of the `vm.run` that produced it.
 */
export interface VmOutputParams {
  data?: string;
  data_base64?: string;
  request_id?: string | number;
  stream: "stderr" | "stdout";
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * `limits` applies to the restored VM as it would to `vm.create`. `wasi` (extension) sets its
 * WASI view; without it the snapshot's args and env are kept and its preopens dropped, since a
 * snapshot file must not grant access to host directories.
 */
export interface VmRestoreParams {
  /**
   * Per-VM budgets by limit name; may only tighten the sidecar's own value.
   */
  limits?: Record<string, number | string>;
  /**
   * A path on the sidecar's file system.
   */
  path: string;
  wasi?: WasiSettings;
}

export interface VmRestoreResult {
  pending_host_calls: Array<PendingHostCall>;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * Runs `_start` in a fresh instance; `args` follow the VM's WASI args, `env` overrides its env.
 *
 * `stream` (extension) sends stdout/stderr as `vm.output` notifications while the run goes on.
 */
export interface VmRunParams {
  args?: Array<string>;
  env?: Record<string, string>;
  stdin?: string;
  stdin_base64?: string;
  stream?: boolean;
  /**
   * Tightens vm_call_timeout_ms for this request; it can never raise it.
   */
  timeout_ms?: number;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

/**
 * Each stream is text when valid UTF-8, `*_base64` otherwise; empty when it was streamed.
 */
export interface VmRunResult {
  elapsed_ms: number;
  exit_code: number;
  stderr?: string;
  stderr_base64?: string;
  stderr_truncated: boolean;
  stdout?: string;
  stdout_base64?: string;
  stdout_truncated: boolean;
}

/**
 * `state` resumes in a sidecar; `wasm` is a pre-initialized module any runtime can run.
 */
export interface VmSnapshotParams {
  format?: "state" | "wasm";
  /**
   * A path on the sidecar's file system.
   */
  path: string;
  /**
   * Opaque id chosen by the sidecar.
   */
  vm_id: string;
}

export interface VmSnapshotResult {
  /**
   * A path on the sidecar's file system.
   */
  path: string;
  sha256: string;
  size_bytes: number;
}

/**
 * The VM's WASI view; nothing of the host is visible to the guest unless listed here.
 */
export interface WasiSettings {
  args?: Array<string>;
  env?: Record<string, string>;
  preopens?: Array<Preopen>;
}

/**
 * Requests a host sends: each method's params and result.
 */
export interface HostRequests {
  /**
   * Handshake: learn the protocol version, capabilities and limits of the sidecar.
   */
  "initialize": { params: InitializeParams; result: InitializeResult };
  /**
   * Compile a module (or take it from the compile cache) and return its content address.
   */
  "module.load": { params: ModuleLoadParams; result: ModuleLoadResult };
  /**
   * Liveness check; answers `{}`.
   */
  "ping": { params: Empty; result: Empty };
  /**
   * Answer `{}`, then dispose every VM and exit with status 0.
   */
  "shutdown": { params: Empty; result: Empty };
  /**
   * Every limit with the value in force and where it came from.
   */
  "sidecar.limits": { params: Empty; result: LimitsResult };
  /**
   * Process-wide counters: requests, dropped responses, pending host calls, VMs, uptime.
   */
  "sidecar.stats": { params: Empty; result: StatsResult };
  /**
   * Call an export with numeric args and optional input; return its results and output.
   */
  "vm.call": { params: VmCallParams; result: VmCallResult };
  /**
   * Create a VM from a module or a runtime, with its mode, budgets and WASI view.
   */
  "vm.create": { params: VmCreateParams; result: VmCreateResult };
  /**
   * End a VM and free its instances; its host calls become stale.
   */
  "vm.dispose": { params: VmDisposeParams; result: Empty };
  /**
   * Run code in a runtime VM's interpreter; return its status, value, output and exception.
   */
  "vm.eval": { params: EvalParams; result: EvalResult };
  /**
   * Move an idle VM's state to the state directory and free its memory; it wakes on demand.
   */
  "vm.hibernate": { params: VmHibernateParams; result: Empty };
  /**
   * Describe every VM, resident or hibernated.
   */
  "vm.list": { params: Empty; result: VmListResult };
  /**
   * Resume a VM from a state snapshot, with the host calls it was waiting on.
   */
  "vm.restore": { params: VmRestoreParams; result: VmRestoreResult };
  /**
   * Run the module's WASI `_start` in a fresh instance; return exit code, stdout and stderr.
   */
  "vm.run": { params: VmRunParams; result: VmRunResult };
  /**
   * Write an idle VM to a file, as a resumable state or a pre-initialized module.
   */
  "vm.snapshot": { params: VmSnapshotParams; result: VmSnapshotResult };
}

/**
 * Notifications a host sends: each method's params.
 */
export interface HostNotifications {
  /**
   * Ask that a request still in flight end with -32800.
   */
  "$/cancelRequest": { params: CancelParams };
}

/**
 * Requests the sidecar sends to its host: each method's params and result.
 */
export interface SidecarRequests {
  /**
   * A guest asks the host; the host answers with any JSON or an error.
   */
  "host.call": { params: HostCallParams; result: unknown };
}

/**
 * Notifications the sidecar sends to its host: each method's params.
 */
export interface SidecarNotifications {
  /**
   * A chunk of a streaming `vm.run`'s stdout or stderr.
   */
  "vm.output": { params: VmOutputParams };
}

// The host's half of the conversation with one wasm-sidecar process.
//
// Owns the child process, the ids of the host's requests and their pending table, and the
// answers to the sidecar's own `host.call` requests. The rules:
// - Every request leaves the pending table exactly once: answered, aborted (its `signal` or its
//   `timeoutMs`: `$/cancelRequest` goes to the sidecar, which stops the work, and the request
//   rejects at once), or the process ended (it rejects with `SidecarExitedError`). An answer
//   that comes after its request left the table is dropped.
// - The host's ids are integers; the sidecar's `host.call` ids are strings of its own. A
//   `host.call` is answered exactly once, with the handler's result or, if it throws, an error.
// - Fields left undefined are left out of the frame (JSON.stringify drops them): optional params
//   are absent on the wire, never null.
// - The process counts as ended on the child's `close` event, after its stdout has been read to
//   the end, so an answer written just before exiting is still delivered.
import { spawn as spawnProcess, type ChildProcess } from "node:child_process";
import type { Readable } from "node:stream";

import { SidecarError, SidecarExitedError } from "./errors.js";
import { LineSplitter } from "./lines.js";
import type {
  EvalResult,
  HostRequests,
  InitializeResult,
  ModuleLoadParams,
  ModuleLoadResult,
  VmCallParams,
  VmCallResult,
  VmCreateParams,
  VmCreateResult,
  VmRestoreParams,
  VmRestoreResult,
  VmSnapshotResult,
} from "./protocol.js";

const CLIENT = { name: "wasm-sidecar-client", version: "0.1.0" };
const PROTOCOL_VERSION = 1;

export interface SpawnOptions {
  /** The sidecar executable; `wasm-sidecar` on PATH by default. */
  command?: string;
  args?: string[];
  /** Added to (and overriding) this process's environment, e.g. `SIDECAR_VM_CALL_TIMEOUT_MS`. */
  env?: Record<string, string | undefined>;
  /**
   * Where the sidecar's logs (JSON lines) go: inherited by default; `"pipe"` exposes
   * `sidecar.stderr`, which must then be read (a full pipe stalls the sidecar).
   */
  stderr?: "inherit" | "ignore" | "pipe" | number;
}

export interface RequestOptions {
  /** Aborting sends `$/cancelRequest` and rejects the request with the signal's reason. */
  signal?: AbortSignal;
  /** Give up after this long, as an abort would, rejecting with a `TimeoutError`. */
  timeoutMs?: number;
}

/** What a `host.call` handler learns besides the guest's method and params. */
export interface HostCallContext {
  vmId: string;
}

/**
 * Answers a guest's `host.call`: its return value (any JSON) is the result; a thrown error
 * becomes a JSON-RPC error answer, with the error's `code` and `data` when it has an integer
 * `code` (a `SidecarError` does), else -32603 and its message.
 */
export type HostCallHandler = (method: string, params: unknown, context: HostCallContext) => unknown;

/** A notification from the sidecar, e.g. `vm.output` for a streaming `vm.run`. */
export type NotificationListener = (method: string, params: unknown) => void;

export interface CallOptions extends RequestOptions {
  args?: number[];
  /** Text goes as `input`, bytes as `input_base64`. */
  input?: string | Uint8Array;
}

export interface EvalOptions {
  stdin?: string;
  /** Tightens the sidecar's `vm_call_timeout_ms` for this eval (the sidecar answers -32004). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface SnapshotOptions {
  format?: "state" | "wasm";
  signal?: AbortSignal;
}

export interface ExitStatus {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
}

interface Pending {
  method: string;
  resolve: (result: unknown) => void;
  reject: (error: unknown) => void;
}

interface Message {
  id?: string | number | null;
  method?: string;
  params?: unknown;
  result?: unknown;
  error?: { code: number; message: string; data?: unknown };
}

export class Sidecar {
  /** The answer to `initialize`: protocol version, server, capabilities (runtimes), limits. */
  serverInfo!: InitializeResult;
  /** Resolves once the process has ended and its output has been read. */
  readonly exited: Promise<ExitStatus>;

  private readonly child: ChildProcess;
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Set<NotificationListener>();
  private hostCallHandler: HostCallHandler | undefined;
  private nextId = 1;
  private exitStatus: ExitStatus | undefined;
  private exitError: Error | undefined;

  private constructor(child: ChildProcess) {
    this.child = child;
    const lines = new LineSplitter();
    child.stdout!.on("data", (chunk: Buffer) => {
      for (const line of lines.feed(chunk)) this.receive(line);
    });
    // A write to a sidecar that already exited fails with EPIPE; `close` reports the exit itself.
    child.stdin!.on("error", () => {});
    let spawnError: Error | undefined;
    this.exited = new Promise((resolve) => {
      child.once("error", (error) => {
        spawnError = error;
        // A process that never started emits no `close` on some platforms: end here too.
        if (child.pid === undefined) this.end({ exitCode: null, signal: null }, error, resolve);
      });
      child.once("close", (exitCode, signal) => this.end({ exitCode, signal }, spawnError, resolve));
    });
  }

  /** Start the sidecar and run `initialize`; `serverInfo` then holds its answer. */
  static async spawn(options: SpawnOptions = {}): Promise<Sidecar> {
    const child = spawnProcess(options.command ?? "wasm-sidecar", options.args ?? [], {
      stdio: ["pipe", "pipe", options.stderr ?? "inherit"],
      env: { ...process.env, ...options.env },
    });
    const sidecar = new Sidecar(child);
    try {
      sidecar.serverInfo = await sidecar.request("initialize", { protocol_version: PROTOCOL_VERSION, client: CLIENT });
    } catch (error) {
      child.kill();
      await sidecar.exited;
      throw error;
    }
    return sidecar;
  }

  /** The sidecar's process id. */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** The sidecar's logs, when spawned with `stderr: "pipe"`. */
  get stderr(): Readable | null {
    return this.child.stderr;
  }

  /** Send a request and wait for its result; an error answer rejects with `SidecarError`. */
  request<M extends keyof HostRequests>(
    method: M,
    params?: HostRequests[M]["params"],
    options?: RequestOptions,
  ): Promise<HostRequests[M]["result"]>;
  request(method: string, params?: unknown, options?: RequestOptions): Promise<unknown>;
  request(method: string, params?: unknown, options: RequestOptions = {}): Promise<unknown> {
    const { signal, timeoutMs } = options;
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.exitStatus) return Promise.reject(this.exitedError(method));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const settle = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        this.pending.delete(id);
      };
      const giveUp = (reason: unknown) => {
        if (!this.pending.has(id)) return;
        settle();
        this.notify("$/cancelRequest", { id });
        reject(reason);
      };
      const onAbort = () => giveUp(signal!.reason);
      this.pending.set(id, {
        method,
        resolve: (result) => (settle(), resolve(result)),
        reject: (error) => (settle(), reject(error)),
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      if (timeoutMs !== undefined) {
        timer = setTimeout(
          () => giveUp(new DOMException(`${method} got no answer within ${timeoutMs} ms`, "TimeoutError")),
          timeoutMs,
        );
      }
      const line = JSON.stringify({ jsonrpc: "2.0", id, method, params });
      const refused = this.oversized(line);
      if (refused) this.pending.get(id)!.reject(refused);
      else this.write(line);
    });
  }

  /** Send a notification (no answer comes). */
  notify(method: string, params?: unknown): void {
    this.send({ jsonrpc: "2.0", method, params });
  }

  /** Answer the sidecar's `host.call` requests with `handler` (replacing any earlier one). */
  onHostCall(handler: HostCallHandler): void {
    this.hostCallHandler = handler;
  }

  /** Listen to the sidecar's notifications; returns the function that stops listening. */
  onNotification(listener: NotificationListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  loadModule(params: ModuleLoadParams, options?: RequestOptions): Promise<ModuleLoadResult> {
    return this.request("module.load", params, options);
  }

  createVm(params: VmCreateParams, options?: RequestOptions): Promise<VmCreateResult> {
    return this.request("vm.create", params, options);
  }

  /** Call the export `name` with numeric `args` and optional `input`. */
  call(vmId: string, name: string, options: CallOptions = {}): Promise<VmCallResult> {
    const { args, input, ...requestOptions } = options;
    const text = typeof input === "string" ? input : undefined;
    const bytes = input instanceof Uint8Array ? Buffer.from(input).toString("base64") : undefined;
    const params: VmCallParams = { vm_id: vmId, export: name, args, input: text, input_base64: bytes };
    return this.request("vm.call", params, requestOptions);
  }

  /** Run `code` in a runtime VM; a Python exception is a result with `status: "error"`. */
  eval(vmId: string, code: string, options: EvalOptions = {}): Promise<EvalResult> {
    const { stdin, timeoutMs, signal } = options;
    return this.request("vm.eval", { vm_id: vmId, code, stdin, timeout_ms: timeoutMs }, { signal });
  }

  /** Write the idle VM to `path` on the sidecar's file system. */
  snapshot(vmId: string, path: string, options: SnapshotOptions = {}): Promise<VmSnapshotResult> {
    const { format, signal } = options;
    return this.request("vm.snapshot", { vm_id: vmId, path, format }, { signal });
  }

  /** Resume a VM from a state snapshot; the result lists the host calls it still waits on. */
  restore(
    path: string,
    params: Omit<VmRestoreParams, "path"> = {},
    options?: RequestOptions,
  ): Promise<VmRestoreResult> {
    return this.request("vm.restore", { ...params, path }, options);
  }

  async dispose(vmId: string): Promise<void> {
    await this.request("vm.dispose", { vm_id: vmId });
  }

  /**
   * End the sidecar's input, which makes it dispose its VMs and exit, and wait for that. After
   * `killAfterMs` without an exit, the process is killed.
   */
  async close(options: { killAfterMs?: number } = {}): Promise<ExitStatus> {
    this.child.stdin!.end();
    if (options.killAfterMs === undefined) return this.exited;
    const timer = setTimeout(() => this.child.kill("SIGKILL"), options.killAfterMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  private send(message: object): void {
    this.write(JSON.stringify(message));
  }

  private write(line: string): void {
    if (this.exitStatus || !this.child.stdin!.writable) return;
    this.child.stdin!.write(`${line}\n`);
  }

  /**
   * The sidecar's own refusal of a frame over `protocol_frame_bytes`, made here: the sidecar
   * answers such a frame with id null, as it cannot read the id, so the request would never settle.
   */
  private oversized(line: string): SidecarError | undefined {
    const capacity = this.serverInfo?.limits.find((row) => row.name === "protocol_frame_bytes");
    const observed = Buffer.byteLength(line);
    if (!capacity || observed <= capacity.value) return undefined;
    return new SidecarError(-32600, `frame larger than protocol_frame_bytes (${capacity.value} bytes)`, {
      kind: "invalid_request",
      limit: capacity.name,
      env: capacity.env,
      capacity: capacity.value,
      observed,
    });
  }

  private receive(line: string): void {
    if (line.trim() === "") return;
    const parsed: unknown = JSON.parse(line);
    for (const message of (Array.isArray(parsed) ? parsed : [parsed]) as Message[]) {
      if (typeof message.method === "string") {
        if (message.id === undefined || message.id === null) this.emit(message.method, message.params);
        else void this.serve(message.id, message.method, message.params);
      } else if (typeof message.id === "number") {
        const pending = this.pending.get(message.id);
        if (!pending) continue; // given up already: the answer is dropped
        const { error } = message;
        if (error) pending.reject(new SidecarError(error.code, error.message, error.data));
        else pending.resolve(message.result);
      }
    }
  }

  private emit(method: string, params: unknown): void {
    for (const listener of this.listeners) listener(method, params);
  }

  private async serve(id: string | number, method: string, params: unknown): Promise<void> {
    const call = (params ?? {}) as { vm_id?: string; method?: string; params?: unknown };
    try {
      if (method !== "host.call" || !this.hostCallHandler) {
        throw new SidecarError(-32601, `host does not serve ${method}`);
      }
      const result = await this.hostCallHandler(call.method ?? "", call.params ?? null, { vmId: call.vm_id ?? "" });
      this.send({ jsonrpc: "2.0", id, result: result ?? null });
    } catch (thrown) {
      this.send({ jsonrpc: "2.0", id, error: errorObject(thrown) });
    }
  }

  private end(status: ExitStatus, cause: Error | undefined, resolve: (status: ExitStatus) => void): void {
    if (this.exitStatus) return;
    this.exitStatus = status;
    this.exitError = cause;
    for (const [, pending] of this.pending) pending.reject(this.exitedError(pending.method));
    resolve(status);
  }

  private exitedError(method: string): SidecarExitedError {
    const { exitCode, signal } = this.exitStatus!;
    const how = this.exitError
      ? `could not run (${this.exitError.message})`
      : `exited (${signal ? `signal ${signal}` : `code ${exitCode}`})`;
    const message = `the sidecar ${how} before answering ${method}`;
    return new SidecarExitedError(message, exitCode, signal, { cause: this.exitError });
  }
}

function errorObject(thrown: unknown): { code: number; message: string; data?: unknown } {
  const error = thrown as { code?: unknown; message?: unknown; data?: unknown } | null;
  const message = typeof error?.message === "string" ? error.message : String(thrown);
  if (typeof error?.code === "number" && Number.isInteger(error.code)) {
    return { code: error.code, message, ...(error.data === undefined ? {} : { data: error.data }) };
  }
  return { code: -32603, message };
}

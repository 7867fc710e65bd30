// The two ways a request can fail: the sidecar answered with an error, or it is gone.

/** The sidecar answered a request with a JSON-RPC error; `data.kind` names it (see SPEC.md, "Errors"). */
export class SidecarError extends Error {
  readonly code: number;
  readonly data: unknown;

  constructor(code: number, message: string, data?: unknown) {
    super(message);
    this.name = "SidecarError";
    this.code = code;
    this.data = data;
  }

  /** `data.kind` when the sidecar sent one: `vm_not_found`, `limit_exceeded`, `cancelled`, ... */
  get kind(): string | undefined {
    const data = this.data as { kind?: unknown } | null | undefined;
    return typeof data?.kind === "string" ? data.kind : undefined;
  }
}

/** The sidecar process ended (or never started) before it answered; nothing more will come. */
export class SidecarExitedError extends Error {
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;

  constructor(message: string, exitCode: number | null, signal: NodeJS.Signals | null, options?: ErrorOptions) {
    super(message, options);
    this.name = "SidecarExitedError";
    this.exitCode = exitCode;
    this.signal = signal;
  }
}

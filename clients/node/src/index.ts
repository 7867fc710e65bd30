// wasm-sidecar-client: spawn wasm-sidecar and drive it from Node.js (see README.md).
export { Sidecar } from "./sidecar.js";
export type {
  CallOptions,
  EvalOptions,
  ExitStatus,
  HostCallContext,
  HostCallHandler,
  NotificationListener,
  RequestOptions,
  SnapshotOptions,
  SpawnOptions,
} from "./sidecar.js";
export { SidecarError, SidecarExitedError } from "./errors.js";
export type * from "./protocol.js";

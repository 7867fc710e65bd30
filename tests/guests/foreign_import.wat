;; Imports a function the sidecar does not provide.
(module
  (import "env" "now" (func (result i64)))
  (func (export "f") (result i32) (i32.const 1))
)

;; Pure numbers, no imports: every wasm number type in and out, plus exports that are not functions.
(module
  (memory (export "memory") 1)
  (global (export "answer") i32 (i32.const 42))
  (table (export "table") 1 funcref)
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "id_i32") (param i32) (result i32) (local.get 0))
  (func (export "id_i64") (param i64) (result i64) (local.get 0))
  (func (export "id_f32") (param f32) (result f32) (local.get 0))
  (func (export "id_f64") (param f64) (result f64) (local.get 0))
  ;; unsigned view of an i32, widened: shows how a u32 argument arrived
  (func (export "as_u32") (param i32) (result i64) (i64.extend_i32_u (local.get 0)))
  (func (export "neg_i64") (param i64) (result i64) (i64.sub (i64.const 0) (local.get 0)))
  ;; multi-value: all four types, reversed
  (func (export "swap") (param i32 i64 f32 f64) (result f64 f32 i64 i32)
    (local.get 3) (local.get 2) (local.get 1) (local.get 0))
  (func (export "nothing"))
)

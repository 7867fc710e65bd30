;; Exports whose types JSON numbers cannot carry: listed by module.load, refused by vm.call.
(module
  (func (export "takes_v128") (param v128) (result i32) (i32.const 1))
  (func (export "gives_v128") (result v128) (v128.const i64x2 1 2))
  (func (export "takes_funcref") (param funcref) (result i32) (i32.const 2))
  (func (export "takes_externref") (param externref) (result i32) (i32.const 3))
  (func (export "gives_externref") (result externref) (ref.null extern))
  (func (export "plain") (result i32) (i32.const 4))
)

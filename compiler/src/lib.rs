//! coopc compiler: pipeline.toml → plan. The front end checks a pipeline
//! into a spec; the model and loss builders and the bilevel lowering turn
//! the spec into IR graphs (the meta-step, the log-prob scorer, the decode
//! step, the LoRA merge), with reverse-mode autodiff as an IR → IR pass;
//! the optimisation passes rewrite them; the scheduler orders each graph
//! and estimates its memory; the fuser partitions each schedule into
//! device kernels. [`compile()`] runs all of it and returns the plan — the
//! only thing later stages read. No device code lives here.

pub mod attention;
pub mod autodiff;
pub mod compile;
pub mod decode;
pub mod frontend;
pub mod fusion;
pub mod linear_logprob;
pub mod losses;
pub mod lowering;
pub mod model;
pub mod optim;
pub mod passes;
pub mod rms_norm;
pub mod rope;
pub mod schedule;

/// The tensor IR (re-exported from `coopc_ir`).
pub use coopc_ir as ir;
pub use coopc_ir::{params, plan, spec};

pub use compile::{
    compile, compile_file, compile_file_with, compile_for_world, compile_gradients, compile_graph,
    compile_logprobs, compile_program, parameter_ports, sampling_programs,
};
pub use ir::{DType, Graph, NodeId, Op, TensorType};

//! coopc compiler: the tensor IR, reverse-mode autodiff as an IR → IR pass,
//! and the optimisation passes. No device code lives here.

pub mod attention;
pub mod autodiff;
pub mod decode;
pub mod frontend;
pub mod fusion;
pub mod ir;
pub mod linear_logprob;
pub mod losses;
pub mod lowering;
pub mod model;
pub mod optim;
pub mod passes;
pub mod plan;
pub mod rms_norm;
pub mod rope;
pub mod schedule;
pub mod spec;

pub use ir::{DType, Graph, NodeId, Op, TensorType};

//! coopc compiler: the tensor IR, reverse-mode autodiff as an IR → IR pass,
//! and the optimisation passes. No device code lives here.

pub mod autodiff;
pub mod ir;
pub mod passes;
pub mod spec;

pub use ir::{DType, Graph, NodeId, Op, TensorType};

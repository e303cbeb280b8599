//! coopc's shared vocabulary — what the compiler produces and every later
//! stage reads:
//!
//! - the tensor IR: typed ops with static shapes on a petgraph graph
//!   ([`Graph`], [`Op`]), its text and DOT printers, and the node order
//!   executors follow ([`execution_order`]);
//! - the pipeline spec ([`spec`]), as the front end validates it;
//! - the parameter schema ([`params`]): Hugging Face and PEFT names;
//! - Hugging Face model folders' `config.json` ([`hf`]);
//! - the kernel IR ([`kernel`]): the fused kernels a schedule becomes;
//! - the plan ([`plan`]): every compiled program with its schedule, fused
//!   kernels and typed signature, and its versioned file format;
//! - the arithmetic count of a program ([`cost`]);
//! - [`file::write_atomically`], how every file coopc writes is replaced.
//!
//! It depends on no other coopc crate.

mod graph;
mod op;
mod order;
mod print;
mod signature;
mod types;

pub mod cost;
pub mod file;
pub mod hf;
pub mod kernel;
pub mod params;
pub mod plan;
pub mod spec;

pub use graph::{Graph, GraphError, Node, NodeId};
pub use op::{
    clamp_value, AttentionOperand, BinaryOp, CompareOp, LogprobOperand, NormOperand, Op,
    ReduceKind, StepOut, StepRule, TokenAgg, TokenLoss, TypeError, UnaryOp,
};
pub use order::{execution_order, order_calls};
pub use print::{to_dot, to_text};
pub use spec::{KlEstimator, PolicyLoss, RatioLevel};
pub use types::{numel, round_bf16, round_bf16_slice, strides, DType, Scalar, Shape, TensorType};

//! The tensor IR: typed ops with static shapes on a petgraph graph.

mod graph;
mod op;
mod print;
mod types;

pub use graph::{Graph, GraphError, Node, NodeId};
pub use op::{
    clamp_value, AttentionOperand, BinaryOp, CompareOp, LogprobOperand, NormOperand, Op,
    ReduceKind, StepOut, StepRule, TokenLoss, TypeError, UnaryOp,
};
pub use print::{to_dot, to_text};
pub use types::{numel, strides, DType, Scalar, Shape, TensorType};

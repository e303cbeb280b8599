//! The error type of the executor: everything that can go wrong when running
//! a graph on host tensors (bad graph, bad inputs, out-of-range indices).

use coopc_ir::{DType, GraphError, TensorType};
use thiserror::Error;

/// Why a graph could not be executed or a tensor could not be built.
///
/// Node numbers are node indices (`NodeId::index()`), the same numbering that
/// [`GraphError`] uses.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ExecError {
    /// `Graph::validate` rejected the graph.
    #[error("invalid graph: {0}")]
    InvalidGraph(#[from] GraphError),

    /// No tensor was bound to an input the requested results depend on.
    #[error("missing input `{name}` of type {expected}")]
    MissingInput { name: String, expected: TensorType },

    /// The tensor bound to an input does not have the input's type (or its
    /// buffer does not match its own shape).
    #[error("input `{name}`: expected {expected}, got {got}")]
    InputMismatch {
        name: String,
        expected: TensorType,
        got: String,
    },

    /// A buffer whose length is not the element count of its shape.
    #[error("a {dtype} buffer of {len} elements does not fit shape {shape:?} ({numel} elements)")]
    BufferLength {
        dtype: DType,
        shape: Vec<usize>,
        len: usize,
        numel: usize,
    },

    /// A gather/scatter/take index outside `0..bound`.
    #[error("node %{node} ({op}): index {index} out of range 0..{bound}")]
    IndexOutOfRange {
        node: usize,
        op: &'static str,
        index: i64,
        bound: usize,
    },

    /// A collective operation of a data-parallel run failed.
    #[error("node %{node} ({op}): {source}")]
    Collective {
        node: usize,
        op: &'static str,
        source: Box<crate::collective::CollectiveError>,
    },

    /// A node id that is not in the graph was requested.
    #[error("node %{node} is not in the graph")]
    UnknownNode { node: usize },

    /// An operand value whose element type the op cannot handle. Cannot
    /// happen for a validated graph with well-typed inputs.
    #[error("node %{node} ({op}): {message}")]
    Unsupported {
        node: usize,
        op: &'static str,
        message: String,
    },

    /// A device backend failed (its message names the node or the cause).
    #[error("{0}")]
    Device(String),

    /// `scalar_f64` on a tensor that does not hold exactly one element.
    #[error("expected a one-element tensor, got shape {shape:?}")]
    NotScalar { shape: Vec<usize> },
}

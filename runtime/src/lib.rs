//! coopc runtime: runs compiled programs. It defines the [`Backend`] trait
//! every executor implements, the CPU reference executor (node by node on
//! host tensors, in the plan's schedule; it defines the numerical semantics
//! every device backend is checked against), the host interpreter of a
//! program's fused kernels, host tensors and values, and safetensors I/O.
//! It depends on the IR and the plan (`coopc_ir`) only, never on the
//! compiler.

pub mod collective;
pub mod cpu;
pub mod error;
pub mod exec;
pub mod fused;
pub mod fused_cpu;
pub mod hf_weights;
pub mod safetensors_io;
pub mod tensor;
pub mod value;

#[cfg(test)]
mod tests;

pub use collective::{Collective, CollectiveError};
pub use error::ExecError;
pub use exec::{
    execute, execute_nodes, execute_program, execute_program_nodes, Backend, CpuBackend,
};
pub use safetensors_io::{
    read_tensors, reject_unexpected, take_all_exact, take_exact, write_tensors, TensorFileError,
    TensorProblem,
};
pub use tensor::{Buffer, Element, HostTensor};
pub use value::{DeviceTensor, Input, Inputs, Transfers, Value};

//! coopc runtime: the CPU reference executor. It runs a tensor graph of the
//! IR on host tensors and defines the numerical semantics every device
//! backend is checked against.

pub mod checkpoint;
pub mod cpu;
pub mod error;
pub mod exec;
pub mod fused;
pub mod init;
pub mod safetensors_io;
pub mod sampler;
pub mod tasks;
pub mod tensor;
pub mod train;
pub mod value;

#[cfg(test)]
mod tests;

pub use error::ExecError;
pub use exec::{execute, execute_nodes, Backend, CpuBackend};
pub use safetensors_io::{
    read_tensors, reject_unexpected, take_all_exact, take_exact, write_tensors, TensorFileError,
    TensorProblem,
};
pub use tensor::{Buffer, Element, HostTensor};
pub use value::{DeviceTensor, Input, Inputs, Transfers, Value};

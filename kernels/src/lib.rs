//! coopc GPU kernels (CubeCL): the generated elementwise and reduction
//! kernels that fused groups become, and the kernels for the remaining IR
//! ops, launchable on CUDA and wgpu, with their source text available
//! without a device.

// In `#[cube]` code, `x - x`, `n * 0` and `n / n` are deliberate: they give
// run-time zeros, ones and NaNs that the kernel compiler cannot fold into
// literals (WGSL has none for NaN, and a mutable variable must start from a
// run-time value).
#![allow(clippy::eq_op, clippy::erasing_op)]

pub mod attention;
pub mod cached_attention;
pub mod device;
pub mod elementwise;
pub mod linear_logprob;
pub mod matmul;
pub mod movement;
pub mod nccl;
pub mod optim;
pub(crate) mod program;
pub mod reduce;
pub mod rms_norm;
pub mod rope;
pub mod sample;
pub mod source;
pub mod token_loss;
pub mod toolkit;

pub use cubecl::cuda::CudaRuntime;
pub use cubecl::wgpu::WgpuRuntime;

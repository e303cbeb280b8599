//! coopc GPU kernels (CubeCL): the generated elementwise and reduction
//! kernels that fused groups become, and the kernels for the remaining IR
//! ops, launchable on CUDA and wgpu, with their source text available
//! without a device.

pub mod device;
pub mod elementwise;
pub mod matmul;
pub mod movement;
pub(crate) mod program;
pub mod reduce;
pub mod source;

pub use cubecl::cuda::CudaRuntime;
pub use cubecl::wgpu::WgpuRuntime;

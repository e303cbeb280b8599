//! Where programs run: `--backend cpu|wgpu|cuda|auto` (or `backend.kind`)
//! turned into a [`Backend`], with a clear error when the requested one is
//! not available.

use crate::cli::UserError;
use coopc_compiler::spec::{BackendKind, BackendSpec, MatmulPrecision, Precision};
use coopc_kernels::device::Device;
use coopc_kernels::matmul::MatmulKernel;
use coopc_runtime::{Backend, CpuBackend};
use std::sync::Arc;

/// Opens the backend `kind` for programs of a pipeline with backend
/// settings `spec` (its element type and matmul precision; `spec.kind` is
/// not read). `auto` takes CUDA when a device answers and the pipeline is
/// f32, else the CPU executor. `COOPC_MATMUL` overrides `spec.matmul`.
pub fn open(kind: BackendKind, spec: &BackendSpec) -> Result<Arc<dyn Backend>, UserError> {
    let dtype = spec.dtype;
    // Read only where a device is opened: the CPU executor has one matmul.
    let matmul = || {
        MatmulKernel::from_env_or(match spec.matmul {
            MatmulPrecision::F32 => MatmulKernel::Cubecl,
            MatmulPrecision::Tf32 => MatmulKernel::CubeclTf32,
        })
    };
    let f32_only = |name: &str| {
        if dtype == Precision::F64 {
            Err(UserError(format!(
                "the {name} backend computes in f32; this pipeline sets backend.dtype = \"f64\" \
                 (use \"f32\", or --backend cpu)"
            )))
        } else {
            Ok(())
        }
    };
    let limit = coopc_kernels::device::memory_limit_from_env().map_err(UserError)?;
    Ok(match kind {
        BackendKind::Cpu => Arc::new(CpuBackend),
        BackendKind::Wgpu => {
            f32_only("wgpu")?;
            let mut d = Device::wgpu_with(matmul()?)?;
            d.memory_limit = limit;
            Arc::new(d)
        }
        BackendKind::Cuda => {
            f32_only("cuda")?;
            let mut d = Device::cuda_with(matmul()?)?;
            d.memory_limit = limit;
            Arc::new(d)
        }
        BackendKind::Auto if dtype == Precision::F64 => Arc::new(CpuBackend),
        BackendKind::Auto => match Device::cuda_with(matmul()?) {
            Ok(mut d) => {
                d.memory_limit = limit;
                Arc::new(d)
            }
            Err(e) => {
                // A machine with an NVIDIA driver was meant to use it: say why not.
                if coopc_kernels::device::cuda_driver_present() {
                    eprintln!(
                        "warning: {e}; running on the CPU executor (--backend cuda makes this an error)"
                    );
                }
                Arc::new(CpuBackend)
            }
        },
    })
}

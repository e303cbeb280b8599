//! Where programs run: `--backend cpu|wgpu|cuda|auto` (or `backend.kind`)
//! turned into a [`Backend`], with a clear error when the requested one is
//! not available.

use crate::cli_grad::UserError;
use coopc_compiler::spec::{BackendKind, Precision};
use coopc_kernels::device::Device;
use coopc_runtime::{Backend, CpuBackend};
use std::sync::Arc;

/// Opens the backend `kind` for programs in `dtype`. `auto` takes CUDA when
/// a device answers and the pipeline is f32, else the CPU executor.
pub fn open(kind: BackendKind, dtype: Precision) -> Result<Arc<dyn Backend>, UserError> {
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
    Ok(match kind {
        BackendKind::Cpu => Arc::new(CpuBackend),
        BackendKind::Wgpu => {
            f32_only("wgpu")?;
            Arc::new(Device::wgpu()?)
        }
        BackendKind::Cuda => {
            f32_only("cuda")?;
            Arc::new(Device::cuda()?)
        }
        BackendKind::Auto => match (dtype, Device::cuda()) {
            (Precision::F32, Ok(d)) => Arc::new(d),
            _ => Arc::new(CpuBackend),
        },
    })
}

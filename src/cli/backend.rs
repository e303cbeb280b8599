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
/// f32 or bf16, else the CPU executor. `COOPC_MATMUL` overrides `spec.matmul`.
pub fn open(kind: BackendKind, spec: &BackendSpec) -> Result<Arc<dyn Backend>, UserError> {
    let dtype = spec.dtype;
    // Read only where a device is opened: the CPU executor has one matmul.
    let matmul = || {
        MatmulKernel::from_env_or(match spec.matmul {
            MatmulPrecision::F32 => MatmulKernel::Cubecl,
            MatmulPrecision::Tf32 => MatmulKernel::CubeclTf32,
        })
    };
    let device_dtype = |name: &str| match dtype {
        Precision::F32 => Ok(()),
        Precision::F64 => Err(UserError(format!(
            "the {name} backend computes in f32; this pipeline sets backend.dtype = \"f64\" \
             (use \"f32\", or --backend cpu)"
        ))),
        // bf16 values in f32 buffers, rounded where stored, as on the CPU.
        Precision::Bf16 => Ok(()),
    };
    let limit = coopc_kernels::device::memory_limit_from_env().map_err(UserError)?;
    Ok(match kind {
        BackendKind::Cpu => Arc::new(CpuBackend),
        BackendKind::Wgpu => {
            device_dtype("wgpu")?;
            let mut d = Device::wgpu_with(matmul()?)?;
            d.memory_limit = limit;
            Arc::new(d)
        }
        BackendKind::Cuda => {
            device_dtype("cuda")?;
            let mut d = Device::cuda_with(matmul()?)?;
            d.memory_limit = limit;
            attach_nccl(&mut d)?;
            Arc::new(d)
        }
        BackendKind::Auto if dtype == Precision::F64 => Arc::new(CpuBackend),
        BackendKind::Auto => match Device::cuda_with(matmul()?) {
            Ok(mut d) => {
                d.memory_limit = limit;
                attach_nccl(&mut d)?;
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

/// In a run of several processes, gives the CUDA device an NCCL
/// communicator so that its sums over the processes stay in device memory:
/// the process's own when the run was started through an NCCL rendezvous,
/// else a new one whose id rank 0 broadcasts over the run's collective
/// (MPI). When some process has no NCCL library, or `COOPC_NCCL=0`, the
/// sums go through the host and MPI instead (all processes agree on it).
fn attach_nccl(d: &mut Device<coopc_kernels::CudaRuntime>) -> Result<(), UserError> {
    use coopc_kernels::nccl;
    if let Some(comm) = nccl::process_comm() {
        d.attach_nccl(comm);
        SUMS_ON_DEVICE.store(true, std::sync::atomic::Ordering::Relaxed);
        return Ok(());
    }
    let world = coopc_runtime::collective::current();
    if world.world() == 1 {
        return Ok(());
    }
    let wanted = std::env::var("COOPC_NCCL").map_or(true, |v| v != "0");
    let mut able = [f64::from(u8::from(wanted && nccl::nccl_present()))];
    world.all_reduce_sum_f64(&mut able)?;
    if able[0] < world.world() as f64 {
        if wanted && world.rank() == 0 {
            eprintln!(
                "warning: {} of {} processes have no NCCL library (libnccl.so.2): the device's \
                 sums over the processes go through the host and {}",
                world.world() - able[0] as usize,
                world.world(),
                world.name()
            );
        }
        return Ok(());
    }
    let ordinal = coopc_kernels::device::cuda_ordinal().map_err(UserError)?;
    let id = nccl::unique_id_over(world.as_ref(), nccl::new_unique_id)?;
    let comm = nccl::NcclComm::new(&id, world.rank(), world.world(), ordinal)?;
    d.attach_nccl(Arc::new(comm));
    SUMS_ON_DEVICE.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Whether a device this process opened sums over the processes through
/// NCCL (see [`attach_nccl`]).
static SUMS_ON_DEVICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the backend opened sums over the processes in device memory
/// (NCCL).
pub fn sums_on_device() -> bool {
    SUMS_ON_DEVICE.load(std::sync::atomic::Ordering::Relaxed)
}

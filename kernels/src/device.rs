//! The device executor: runs a graph's fused schedule on a CubeCL runtime
//! (CUDA or wgpu). Inputs are uploaded once per call, every kernel runs on
//! the device, each intermediate buffer is released after its last use,
//! and only the requested outputs are read back.
//!
//! Every device tensor is f32: integer ids and booleans are stored as whole
//! numbers (exact below 2²⁴), bf16 values as f32 rounded to bf16 wherever
//! one is stored, as the CPU executor holds them, and a graph in f64 is
//! refused — WGSL has no f64 and the GPU path computes in f32.

use crate::attention::AttentionShape;
use crate::cached_attention::{cached_attention, CACHED_BLOCK, CACHED_CHUNK};
use crate::elementwise::elementwise_program;
use crate::linear_logprob::LogprobShape;
use crate::matmul::{MatmulKernel, MatmulShape};
use crate::movement::{
    gather_rows, iota, one_hot, scatter_add_along, scatter_add_rows, strided_copy, take_along,
    write_slice, CopySpec,
};
use crate::optim::{adamw_step, momentum_step, sgd_step, StepSpec};
use crate::program::{bf16_rounding, rounds_bf16_itself};
use crate::reduce::{reduce_program, reduce_program_rows, ReduceSpec};
use crate::rms_norm::{
    rms_norm_backward_w, rms_norm_backward_x, rms_norm_forward, rms_norm_inv_rms, NORM_BLOCK,
    NORM_COLS, NORM_LANES,
};
use crate::rope::rope;
use crate::token_loss::{token_loss, token_loss_grad, LossSpec, LOSS_BLOCK};
use coopc_ir::kernel::{ElemInstr, ElemProgram, FusedSchedule, Index, Kernel, ReduceSplit};
use coopc_ir::plan::Program;
use coopc_ir::{
    numel, AttentionOperand, DType, Graph, LogprobOperand, NodeId, NormOperand, Op, Scalar,
    StepRule, TensorType, UnaryOp,
};
use coopc_runtime::{
    Backend, DeviceTensor, ExecError, HostTensor, Input, Inputs, Transfers, Value,
};
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::cell::Cell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Units per cube of the one-dimensional kernels.
pub const BLOCK: u32 = 256;

/// Why a graph could not run on the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("the {backend} backend is not available on this machine: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("the {backend} backend runs f32 programs only; this graph holds {dtype} values (set backend.dtype = \"f32\", or run it on the CPU executor)")]
    Precision { backend: &'static str, dtype: DType },
    #[error("missing input `{0}`")]
    MissingInput(String),
    #[error("input `{name}`: expected {expected}, got {got}")]
    InputMismatch {
        name: String,
        expected: String,
        got: String,
    },
    #[error("node %{node} ({op}): {message}")]
    Unsupported {
        node: usize,
        op: &'static str,
        message: String,
    },
    #[error("device failure: {0}")]
    Device(String),
    /// A sum over the run's processes failed (a peer stopped, or the
    /// communication library reported an error).
    #[error("node %{node} (all_reduce_sum): {source}")]
    Collective {
        node: usize,
        source: coopc_runtime::collective::CollectiveError,
    },
    #[error(
        "out of device memory at kernel {kernel} of {kernels} ({what}): it needs {bytes} bytes \
         with {in_use} in use, over the limit of {limit} bytes (COOPC_DEVICE_MEMORY_LIMIT)"
    )]
    OutOfMemory {
        kernel: usize,
        kernels: usize,
        what: String,
        bytes: u64,
        in_use: u64,
        limit: u64,
    },
    #[error("kernel {kernel} of {kernels} ({what}, {bytes} bytes of outputs and scratch) failed: {message}")]
    Launch {
        kernel: usize,
        kernels: usize,
        what: String,
        bytes: u64,
        message: String,
    },
}

/// The device memory limit `COOPC_DEVICE_MEMORY_LIMIT` sets (bytes, or
/// with a `KiB`, `MiB` or `GiB` suffix); `None` when it is not set.
pub fn memory_limit_from_env() -> Result<Option<u64>, String> {
    let Ok(text) = std::env::var("COOPC_DEVICE_MEMORY_LIMIT") else {
        return Ok(None);
    };
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => 0,
    };
    match digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(n) if scale > 0 => Ok(Some(n)),
        _ => Err(format!(
            "COOPC_DEVICE_MEMORY_LIMIT = {text:?}: expected bytes, or a number with KiB, MiB or GiB"
        )),
    }
}

/// What a kernel is, for messages: its kind and the nodes it writes.
fn describe(g: &Graph, kernel: &Kernel) -> String {
    let kind = match kernel {
        Kernel::Elementwise { .. } => "fused elementwise".to_string(),
        Kernel::Reduce { .. } => "fused reduction".to_string(),
        Kernel::MatMul { .. } => "matmul".to_string(),
        Kernel::LinearLogprob { .. } => "fused linear log-prob".to_string(),
        Kernel::Attention { .. } => "attention".to_string(),
        Kernel::AttentionGrads { .. } => "attention gradients".to_string(),
        Kernel::LogprobGrads { .. } => "linear log-prob gradients".to_string(),
        Kernel::OptimStep { .. } => "optimiser step".to_string(),
        Kernel::Node(id) => g.op(*id).name().to_string(),
    };
    let writes = kernel.writes();
    let shown: Vec<String> = writes
        .iter()
        .take(3)
        .map(|w| format!("%{} {:?}", w.index(), g.ty(*w).shape))
        .collect();
    let more = if writes.len() > 3 {
        format!(" and {} more", writes.len() - 3)
    } else {
        String::new()
    };
    format!("{kind} writing {}{more}", shown.join(", "))
}

/// Bytes of device buffers a kernel allocates: its outputs (f32), its
/// scratch, and the rounded copies of bf16 results it does not round
/// itself (`Device::launch`).
fn kernel_bytes(g: &Graph, kernel: &Kernel) -> u64 {
    let rounds_itself = rounds_bf16_itself(g, kernel);
    let outputs: usize = kernel
        .writes()
        .iter()
        .map(|w| {
            let copies = if !rounds_itself && g.ty(*w).dtype == DType::Bf16 {
                2
            } else {
                1
            };
            copies * g.ty(*w).numel() * 4
        })
        .sum();
    (outputs + kernel.scratch_bytes(g)) as u64
}

/// The first panic message of any thread since the last [`take_panic`]
/// (CubeCL runs each device server on its own thread; a failure there
/// reaches the caller only as a lost channel).
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);
thread_local! {
    /// Whether this thread is inside a guarded device call.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "<non-string panic>".into());
            let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(msg);
            }
            drop(first);
            // Outside a guarded device call a panic is reported as usual.
            if !GUARDED.with(Cell::get) || std::env::var_os("COOPC_DEBUG_PANICS").is_some() {
                default(info);
            }
        }));
    });
}

fn take_panic() -> Option<String> {
    FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Runs `f`, turning a panic (on this or a device thread) into an error.
pub(crate) fn guarded<T>(
    what: impl Fn(String) -> DeviceError,
    f: impl FnOnce() -> T,
) -> Result<T, DeviceError> {
    install_panic_hook();
    take_panic();
    let outer = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    match r {
        Ok(v) => Ok(v),
        Err(_) => Err(what(
            take_panic().unwrap_or_else(|| "unknown failure".into()),
        )),
    }
}

/// A graph prepared for the device: its fused schedule and when each value
/// is last used.
pub struct Prepared {
    pub fused: FusedSchedule,
    /// Kernel index after which a node's buffer can be released.
    last_use: HashMap<NodeId, usize>,
    outputs: Vec<(String, NodeId)>,
    /// Literal nodes already uploaded, so that a graph run again (every
    /// meta-step, every decoded token) does not copy its constants again.
    literals: Mutex<HashMap<NodeId, Handle>>,
    /// An element type of the graph the device kernels do not compute in
    /// (f64), found once here.
    unsupported: Option<DType>,
}

impl Prepared {
    /// `g` with its fused schedule (a plan's program: [`Prepared::of`]).
    pub fn new(g: &Graph, fused: FusedSchedule) -> Prepared {
        Prepared {
            last_use: fused.last_uses(g),
            // bf16 values live in f32 buffers: the fused programs round
            // each one they compute (the other kernels' results are
            // rounded after them, `Device::launch`).
            fused: fused.rounding_bf16(g),
            outputs: g.outputs().to_vec(),
            literals: Mutex::default(),
            unsupported: g
                .node_ids()
                .map(|id| g.ty(id).dtype)
                .find(|&d| d == DType::F64),
        }
    }

    /// A compiled program, launched as the plan fused it.
    pub fn of(program: &Program) -> Prepared {
        Prepared::new(&program.graph, program.fused.clone())
    }
}

/// A CubeCL device with the kernels of this crate.
pub struct Device<R: Runtime> {
    client: ComputeClient<R>,
    backend: &'static str,
    /// Poison every output buffer before its kernel runs (tests: an element
    /// a kernel fails to write stays NaN).
    pub poison: bool,
    /// The kernel of the schedule's matrix products.
    pub matmul: MatmulKernel,
    /// Whether CubeCL's matmul may read and write views of buffers (at
    /// offsets); checked when the device is made.
    pub(crate) matmul_views: bool,
    /// Fused schedules of the graphs run through [`Backend::run`], by
    /// structural fingerprint.
    prepared: Mutex<HashMap<u64, Arc<Prepared>>>,
    /// Bytes copied host → device and device → host.
    uploaded: AtomicU64,
    downloaded: AtomicU64,
    /// Distinguishes this device's resident values from another's.
    id: u64,
    /// Whether [`Backend::track_memory`] is on, and the most bytes in use
    /// after any kernel since it was turned on.
    tracking: AtomicBool,
    peak_in_use: AtomicU64,
    /// Products for which CubeCL's matmul was asked for but coopc's
    /// kernels ran (an unaligned view, or a problem CubeCL's refused).
    pub(crate) matmul_fallbacks: AtomicU64,
    /// At most this many bytes of device memory in use: a kernel whose
    /// buffers would pass it fails with [`DeviceError::OutOfMemory`]
    /// before it launches (`COOPC_DEVICE_MEMORY_LIMIT`).
    pub memory_limit: Option<u64>,
    /// Sums `AllReduceSum` nodes in device memory (NCCL); without it they
    /// go through the host and the process's collective.
    device_sum: Option<Arc<dyn DeviceSum<R>>>,
}

/// A sum over the run's processes of buffers in device memory.
pub trait DeviceSum<R: Runtime>: Send + Sync {
    /// `dst ← Σ_ranks src`, both of `numel` f32 elements on `client`'s
    /// device.
    fn sum(
        &self,
        client: &ComputeClient<R>,
        src: &Handle,
        dst: &Handle,
        numel: usize,
    ) -> Result<(), coopc_runtime::collective::CollectiveError>;
}

/// Source of [`Device`] ids.
static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(0);

/// A device buffer behind a [`DeviceTensor`]: the handle and its element
/// count (every device tensor is stored as f32).
struct Resident {
    handle: Handle,
    numel: usize,
    /// The [`Device`] whose client made the buffer.
    device: u64,
}

/// A hash of everything that decides a graph's fused schedule: every node's
/// op, type and operands, and the outputs.
fn fingerprint(g: &Graph) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for id in g.node_ids() {
        id.index().hash(&mut h);
        g.op(id).hash(&mut h);
        g.ty(id).hash(&mut h);
        for x in g.inputs(id) {
            x.index().hash(&mut h);
        }
    }
    for (name, id) in g.outputs() {
        name.hash(&mut h);
        id.index().hash(&mut h);
    }
    h.finish()
}

impl<R: Runtime> Backend for Device<R> {
    fn name(&self) -> &'static str {
        self.backend
    }

    fn run(
        &self,
        program: &Program,
        inputs: &HashMap<String, HostTensor>,
    ) -> Result<Vec<(String, HostTensor)>, ExecError> {
        let prepared = self.prepared_for(program);
        self.execute(&program.graph, &prepared, inputs)
            .map_err(|e| self.program_error(program, e))
    }

    fn run_values(
        &self,
        program: &Program,
        inputs: &HashMap<String, Value>,
        to_host: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Value)>, ExecError> {
        let prepared = self.prepared_for(program);
        self.execute_values(&program.graph, &prepared, inputs, to_host)
            .map_err(|e| self.program_error(program, e))
    }

    fn to_host(&self, value: &Value) -> Result<HostTensor, ExecError> {
        match value {
            Value::Host(t) => Ok((**t).clone()),
            Value::Device(d) => self.read_back(d).map_err(|e| self.exec_error(e)),
        }
    }

    fn resident(&self, value: Value) -> Result<Value, ExecError> {
        let t = match value {
            Value::Device(d) => {
                self.unwrap_resident(&d).map_err(|e| self.exec_error(e))?;
                return Ok(Value::Device(d));
            }
            Value::Host(t) => t,
        };
        let ty = t.ty();
        if ty.dtype == DType::F64 {
            return Err(self.exec_error(DeviceError::Precision {
                backend: self.backend,
                dtype: DType::F64,
            }));
        }
        let handle = guarded(DeviceError::Device, || self.upload_host(&t))
            .map_err(|e| self.exec_error(e))?;
        Ok(self.wrap(ty, handle))
    }

    fn zeros(&self, ty: &TensorType) -> Result<Value, ExecError> {
        let n = ty.numel();
        let handle = guarded(DeviceError::Device, || {
            let h = self.output(n);
            self.elementwise(
                &ElemProgram::constant(0.0),
                n,
                &[],
                std::slice::from_ref(&h),
            );
            h
        })
        .map_err(|e| self.exec_error(e))?;
        Ok(self.wrap(ty.clone(), handle))
    }

    fn samples_tokens(&self) -> bool {
        true
    }

    fn sample_tokens(
        &self,
        logits: &Value,
        draws: &[f64],
        temperature: f64,
        top_p: f64,
        greedy: bool,
    ) -> Result<Vec<Option<i32>>, ExecError> {
        let resident;
        let handle = match logits {
            Value::Device(d) => {
                resident = self.unwrap_resident(d).map_err(|e| self.exec_error(e))?;
                resident.handle.clone()
            }
            Value::Host(t) => guarded(DeviceError::Device, || self.upload_host(t))
                .map_err(|e| self.exec_error(e))?,
        };
        let ty = logits.ty();
        if ty.rank() != 2 {
            return Err(self.exec_error(DeviceError::Device(format!(
                "sampling needs [rows, vocab] logits, got {ty}"
            ))));
        }
        let (rows, vocab) = (ty.shape[0], ty.shape[1]);
        let draws: Vec<f32> = draws.iter().map(|&u| u as f32).collect();
        let tokens = guarded(DeviceError::Device, || {
            self.sample_rows(
                &handle,
                rows,
                vocab,
                &draws,
                temperature as f32,
                top_p as f32,
                greedy,
            )
        })
        .and_then(|r| r)
        .map_err(|e| self.exec_error(e))?;
        Ok(tokens
            .into_iter()
            .map(|t| (t != crate::sample::NON_FINITE).then_some(t))
            .collect())
    }

    fn transfers(&self) -> Option<Transfers> {
        Some(Transfers {
            uploaded: self.uploaded.load(Ordering::Relaxed),
            downloaded: self.downloaded.load(Ordering::Relaxed),
        })
    }

    fn track_memory(&self, on: bool) {
        let now = if on {
            self.bytes_in_use().unwrap_or(0)
        } else {
            0
        };
        self.peak_in_use.store(now, Ordering::Relaxed);
        self.tracking.store(on, Ordering::Relaxed);
    }

    fn memory_peak(&self) -> Option<u64> {
        Some(self.peak_in_use.load(Ordering::Relaxed))
    }
}

/// Bytes of shared memory per cube the largest of coopc's own kernels
/// uses: the attention backward's key-side kernel, with `[16, 129]` tiles
/// of q and dO, `[8, 129]` of k and v, and `[16, 9]` of the probabilities
/// and their gradients. `tests/kernel_cuda_compile.rs` holds every kernel
/// coopc generates to it. A device that offers less per cube is refused
/// when it is opened (desktop and data-centre GPUs offer 32 KiB or more;
/// WebGPU's minimum is 16 KiB).
pub const SHARED_BYTES_NEEDED: usize = 25_920;

/// Refuses a device that offers `offered` bytes of shared memory per cube,
/// fewer than [`SHARED_BYTES_NEEDED`].
pub fn check_shared_memory(backend: &'static str, offered: usize) -> Result<(), DeviceError> {
    if offered >= SHARED_BYTES_NEEDED {
        return Ok(());
    }
    Err(DeviceError::Unavailable {
        backend,
        reason: format!(
            "the device offers {offered} bytes of shared memory per cube (workgroup); \
             coopc's kernels need {SHARED_BYTES_NEEDED}"
        ),
    })
}

impl<R: Runtime> Device<R> {
    /// A device on `client` with nothing resident, its products run by
    /// `matmul` (not yet checked: see `settle_matmul`).
    fn with_client(client: ComputeClient<R>, backend: &'static str, matmul: MatmulKernel) -> Self {
        Device {
            client,
            backend,
            poison: false,
            matmul,
            matmul_views: true,
            prepared: Mutex::default(),
            uploaded: AtomicU64::new(0),
            downloaded: AtomicU64::new(0),
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            tracking: AtomicBool::new(false),
            peak_in_use: AtomicU64::new(0),
            matmul_fallbacks: AtomicU64::new(0),
            memory_limit: None,
            device_sum: None,
        }
    }
}

impl Device<cubecl::wgpu::WgpuRuntime> {
    /// The default wgpu adapter (a GPU, or Mesa's lavapipe on the CPU),
    /// its products run by CubeCL's f32 matmul (or what `COOPC_MATMUL`
    /// says).
    pub fn wgpu() -> Result<Self, DeviceError> {
        Self::wgpu_with(MatmulKernel::from_env_or(MatmulKernel::Cubecl)?)
    }

    /// The default wgpu adapter, its products run by `matmul`.
    pub fn wgpu_with(matmul: MatmulKernel) -> Result<Self, DeviceError> {
        let client = guarded(
            |reason| DeviceError::Unavailable {
                backend: "wgpu",
                reason,
            },
            || cubecl::wgpu::WgpuRuntime::client(&Default::default()),
        )?;
        check_shared_memory("wgpu", client.properties().hardware.max_shared_memory_size)?;
        let mut dev = Device::with_client(client, "wgpu", matmul);
        dev.settle_matmul();
        Ok(dev)
    }
}

impl Device<cubecl::cuda::CudaRuntime> {
    /// The process's CUDA device ([`cuda_ordinal`]: `COOPC_CUDA_DEVICE`,
    /// else one per local rank, else 0; needs libcuda and NVRTC at run
    /// time), its products
    /// run by CubeCL's f32 matmul (or what `COOPC_MATMUL` says).
    pub fn cuda() -> Result<Self, DeviceError> {
        Self::cuda_with(MatmulKernel::from_env_or(MatmulKernel::Cubecl)?)
    }

    /// The process's CUDA device ([`cuda_ordinal`]), its products run by
    /// `matmul`.
    pub fn cuda_with(matmul: MatmulKernel) -> Result<Self, DeviceError> {
        // Look for the driver, NVRTC and the CUDA headers first: without
        // them CubeCL's device thread panics.
        if !cuda_driver_present() {
            return Err(DeviceError::Unavailable {
                backend: "cuda",
                reason: "no NVIDIA driver library (libcuda.so) found".into(),
            });
        }
        crate::toolkit::cuda_toolkit().map_err(|reason| DeviceError::Unavailable {
            backend: "cuda",
            reason,
        })?;
        let ordinal = cuda_ordinal().map_err(|reason| DeviceError::Unavailable {
            backend: "cuda",
            reason,
        })?;
        let client = guarded(
            |reason| DeviceError::Unavailable {
                backend: "cuda",
                reason,
            },
            || cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(ordinal)),
        )?;
        check_shared_memory("cuda", client.properties().hardware.max_shared_memory_size)?;
        let mut dev = Device::with_client(client, "cuda", matmul);
        // A client can exist without a working compiler: run one kernel.
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![2]);
        let y = g.exp(x);
        g.set_output("y", y);
        let exp = ElemProgram {
            n_inputs: 1,
            instrs: vec![
                ElemInstr::Load {
                    input: 0,
                    index: Index::Same,
                },
                ElemInstr::Unary(UnaryOp::Exp, 0),
            ],
            outputs: vec![1],
        };
        let fused = FusedSchedule {
            kernels: vec![Kernel::Elementwise {
                program: exp,
                numel: 2,
                inputs: vec![x],
                outputs: vec![y],
            }],
            fused_nodes: 1,
        };
        let prepared = Prepared::new(&g, fused);
        let inputs = HashMap::from([("x".to_string(), HostTensor::f32(vec![2], vec![1.0, 2.0]))]);
        dev.execute(&g, &prepared, &inputs)
            .map_err(|e| DeviceError::Unavailable {
                backend: "cuda",
                reason: e.to_string(),
            })?;
        dev.settle_matmul();
        Ok(dev)
    }
}

impl Device<cubecl::cuda::CudaRuntime> {
    /// Sums the graphs' `AllReduceSum` nodes with `comm` in device memory
    /// (it must be on this device).
    pub fn attach_nccl(&mut self, comm: Arc<crate::nccl::NcclComm>) {
        self.device_sum = Some(comm);
    }

    /// Whether `AllReduceSum` nodes are summed in device memory.
    pub fn sums_on_device(&self) -> bool {
        self.device_sum.is_some()
    }
}

/// Environment variables in which launchers give a process its rank among
/// the processes of its machine (Open MPI, MPICH/Intel MPI, Slurm,
/// torchrun).
const LOCAL_RANK_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
    "LOCAL_RANK",
];

/// The CUDA device this process uses: `COOPC_CUDA_DEVICE` when set; else,
/// in a run of several processes per machine, the process's local rank
/// modulo the machine's device count (one process per GPU); else 0.
pub fn cuda_ordinal() -> Result<usize, String> {
    let parse = |var: &str, text: &str| {
        text.trim()
            .parse::<usize>()
            .map_err(|_| format!("{var} = {text:?} is not a device number"))
    };
    if let Ok(text) = std::env::var("COOPC_CUDA_DEVICE") {
        return parse("COOPC_CUDA_DEVICE", &text);
    }
    let local = LOCAL_RANK_VARS
        .iter()
        .find_map(|var| std::env::var(var).ok().map(|text| (var, text)));
    let Some((var, text)) = local else {
        return Ok(0);
    };
    let local = parse(var, &text)?;
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("counting CUDA devices: {e}"))?;
    if count < 1 {
        return Err("no CUDA device found".into());
    }
    Ok(local % count as usize)
}

/// Whether the NVIDIA driver library loads (a machine with an NVIDIA GPU).
pub fn cuda_driver_present() -> bool {
    ["libcuda.so.1", "libcuda.so"]
        .iter()
        // SAFETY: the driver library's initialisers have no preconditions.
        .any(|name| unsafe { libloading::Library::new(name) }.is_ok())
}

/// Cubes of [`BLOCK`] units for `n` one-per-unit work items.
fn cube_count(n: usize) -> CubeCount {
    cubes(n.div_ceil(BLOCK as usize))
}

/// `n` cubes (at least one), laid out within the grid's 65,535 limit.
pub(crate) fn cubes(n: usize) -> CubeCount {
    let n = n.max(1) as u32;
    let x = n.min(65_535);
    CubeCount::Static(x, n.div_ceil(x), 1)
}

/// A launch argument for buffer `h` of `len` elements.
pub(crate) fn arg<R: Runtime>(h: &Handle, len: usize) -> ArrayArg<R> {
    unsafe { ArrayArg::from_raw_parts(h.clone(), len.max(1)) }
}

/// A sequence launch argument of buffers, each with its length.
fn sequence<'a, R: Runtime>(
    bufs: impl IntoIterator<Item = (&'a Handle, usize)>,
) -> SequenceArg<R, Array<f32>> {
    let mut seq = SequenceArg::new();
    for (h, n) in bufs {
        seq.push(arg(h, n));
    }
    seq
}

impl<R: Runtime> Device<R> {
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    pub fn upload(&self, v: &[f32]) -> Handle {
        let v = if v.is_empty() { &[0.0f32][..] } else { v };
        self.uploaded
            .fetch_add(4 * v.len() as u64, Ordering::Relaxed);
        self.client.create_from_slice(f32::as_bytes(v))
    }

    /// A host tensor's elements as f32 (ids and booleans as whole numbers).
    pub fn upload_host(&self, t: &HostTensor) -> Handle {
        let v: Vec<f32> = t.to_f64_vec().into_iter().map(|x| x as f32).collect();
        self.upload(&v)
    }

    /// A buffer for `n` results (NaN-filled when poisoning).
    pub fn output(&self, n: usize) -> Handle {
        if self.poison {
            self.upload(&vec![f32::NAN; n.max(1)])
        } else {
            self.client.empty(n.max(1) * 4)
        }
    }

    pub fn download(&self, h: Handle, n: usize) -> Result<Vec<f32>, DeviceError> {
        let bytes = guarded(DeviceError::Device, || self.client.read_one(h))?
            .map_err(|e| DeviceError::Device(format!("{e:?}")))?;
        self.downloaded
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(f32::from_bytes(&bytes)[..n].to_vec())
    }

    /// A program's launch state (its fused kernels, buffer lifetimes and
    /// uploaded literals), made once per program structure.
    fn prepared_for(&self, program: &Program) -> Arc<Prepared> {
        let key = fingerprint(&program.graph);
        let mut cache = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| Arc::new(Prepared::of(program)))
            .clone()
    }

    fn exec_error(&self, e: DeviceError) -> ExecError {
        ExecError::Device(format!("{} backend: {e}", self.backend))
    }

    /// [`Device::exec_error`] naming the program that failed.
    fn program_error(&self, program: &Program, e: DeviceError) -> ExecError {
        ExecError::Device(format!(
            "{} backend, program `{}`: {e}",
            self.backend,
            program.kind.name()
        ))
    }

    /// A buffer of this device as a resident value of type `ty`.
    fn wrap(&self, ty: TensorType, handle: Handle) -> Value {
        let numel = ty.numel();
        Value::Device(DeviceTensor {
            ty,
            backend: self.backend,
            handle: Arc::new(Resident {
                handle,
                numel,
                device: self.id,
            }),
        })
    }

    /// The buffer behind a resident value, if this device made it.
    fn unwrap_resident<'a>(&self, d: &'a DeviceTensor) -> Result<&'a Resident, DeviceError> {
        d.handle
            .downcast_ref::<Resident>()
            .filter(|r| d.backend == self.backend && r.device == self.id)
            .ok_or_else(|| {
                DeviceError::Device(format!(
                    "a value of type {} belongs to another {} device, not to this {} device",
                    d.ty, d.backend, self.backend
                ))
            })
    }

    /// When node `id`, run as kernel `k`, is an `update_slice` that may
    /// write into its base's buffer: the caller's value of the base, a
    /// donated input ([`Graph::donate`]) resident on the device that
    /// nothing but the caller's inputs holds and no later kernel reads.
    /// ([`Self::update_donated`] also checks that no other value shares
    /// the buffer.)
    fn donated_base<'a, I: Inputs>(
        &self,
        g: &Graph,
        id: NodeId,
        inputs: &'a I,
        prepared: &Prepared,
        k: usize,
    ) -> Option<&'a DeviceTensor> {
        if !matches!(g.op(id), Op::UpdateSlice { .. }) {
            return None;
        }
        let base = g.inputs(id)[0];
        let Op::Input { name, .. } = g.op(base) else {
            return None;
        };
        if !g.is_donated(name) || prepared.last_use.get(&base) != Some(&k) {
            return None;
        }
        match inputs.input(name) {
            Some(Input::Device(d)) if Arc::strong_count(&d.handle) == 1 => Some(d),
            _ => None,
        }
    }

    /// Runs `update_slice` node `id` (kernel `kernel`) on the donated base
    /// `base`: into the base's own buffer when no other value shares it,
    /// else as usual (a copy, then the write).
    fn update_donated<I: Inputs>(
        &self,
        g: &Graph,
        kernel: &Kernel,
        id: NodeId,
        base: &DeviceTensor,
        inputs: &I,
        values: &mut HashMap<NodeId, Handle>,
    ) -> Result<Vec<(NodeId, Handle)>, DeviceError> {
        let ops = g.inputs(id);
        // This is the base's last reader: drop the run's own reference, so
        // that the caller's value is the buffer's only holder if nothing
        // else shares it.
        values.remove(&ops[0]);
        let resident = &self.unwrap_resident(base)?.handle;
        let only_holder = resident.can_mut();
        let h = resident.clone();
        if !only_holder {
            values.insert(ops[0], h);
            return self.launch(g, kernel, inputs, values);
        }
        // The donated buffer becomes the output.
        self.launch_write_slice(g, id, &values[&ops[1]], &values[&ops[2]], &h);
        Ok(vec![(id, h)])
    }

    /// `update_slice` node `id`'s update written into `out` (a copy of the
    /// base, or the donated base itself).
    fn launch_write_slice(
        &self,
        g: &Graph,
        id: NodeId,
        upd: &Handle,
        index: &Handle,
        out: &Handle,
    ) {
        let Op::UpdateSlice { axis } = g.op(id) else {
            unreachable!("an update_slice node")
        };
        let shape = &g.ty(id).shape;
        let n_upd = g.ty(g.inputs(id)[1]).numel();
        if n_upd == 0 {
            return;
        }
        write_slice::launch::<R>(
            &self.client,
            cube_count(n_upd),
            CubeDim::new_1d(BLOCK),
            arg(upd, n_upd),
            arg(index, 1),
            arg(out, g.ty(id).numel()),
            n_upd as u32,
            shape[*axis] as u32,
            numel(&shape[axis + 1..]).max(1) as u32,
        );
    }

    /// Reads a resident value back into a host tensor of its type.
    fn read_back(&self, d: &DeviceTensor) -> Result<HostTensor, DeviceError> {
        let r = self.unwrap_resident(d)?;
        self.to_host_tensor(&d.ty, r.handle.clone())
    }

    fn to_host_tensor(&self, ty: &TensorType, h: Handle) -> Result<HostTensor, DeviceError> {
        let v = self.download(h, ty.numel())?;
        let v: Vec<f64> = v.into_iter().map(f64::from).collect();
        HostTensor::from_f64(ty.dtype, ty.shape.clone(), &v)
            .map_err(|e| DeviceError::Device(e.to_string()))
    }

    /// Bytes the device's allocator holds now.
    pub fn bytes_in_use(&self) -> Option<u64> {
        self.client.memory_usage().ok().map(|m| m.bytes_in_use)
    }

    /// Raises the tracked peak ([`Backend::track_memory`]) to the bytes in
    /// use now, while tracking is on.
    pub(crate) fn note_memory(&self) {
        if self.tracking.load(Ordering::Relaxed) {
            let used = self.bytes_in_use().unwrap_or(0);
            self.peak_in_use.fetch_max(used, Ordering::Relaxed);
        }
    }

    /// Runs `g` (prepared by [`Prepared::new`]) and returns its outputs by
    /// name, converted to their graph types.
    pub fn execute<I: Inputs>(
        &self,
        g: &Graph,
        prepared: &Prepared,
        inputs: &I,
    ) -> Result<Vec<(String, HostTensor)>, DeviceError> {
        self.execute_values(g, prepared, inputs, &|_| true)?
            .into_iter()
            .map(|(name, v)| match v {
                Value::Host(t) => Ok((name, Arc::unwrap_or_clone(t))),
                Value::Device(d) => Ok((name, self.read_back(&d)?)),
            })
            .collect()
    }

    /// Runs `g` on inputs that are host tensors or values resident on this
    /// device. Outputs named by `to_host` are read back; the others stay on
    /// the device as [`Value::Device`].
    pub fn execute_values<I: Inputs>(
        &self,
        g: &Graph,
        prepared: &Prepared,
        inputs: &I,
        to_host: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Value)>, DeviceError> {
        // f64 has no device kernels.
        if let Some(dtype) = prepared.unsupported {
            return Err(DeviceError::Precision {
                backend: self.backend,
                dtype,
            });
        }
        let kernels = prepared.fused.kernels.len();
        // The kernel running, so that a failure inside it is named.
        let at = Cell::new(None::<usize>);
        let result = guarded(DeviceError::Device, || {
            let mut values: HashMap<NodeId, Handle> = HashMap::new();
            for (k, kernel) in prepared.fused.kernels.iter().enumerate() {
                at.set(Some(k));
                if let Some(limit) = self.memory_limit {
                    let bytes = kernel_bytes(g, kernel);
                    let in_use = self.bytes_in_use().unwrap_or(0);
                    if in_use.saturating_add(bytes) > limit {
                        return Err(DeviceError::OutOfMemory {
                            kernel: k,
                            kernels,
                            what: describe(g, kernel),
                            bytes,
                            in_use,
                            limit,
                        });
                    }
                }
                let produced = match kernel {
                    Kernel::Node(id) if matches!(g.op(*id), Op::Literal { .. }) => {
                        let mut lits = prepared.literals.lock().unwrap_or_else(|e| e.into_inner());
                        match lits.get(id) {
                            Some(h) => vec![(*id, h.clone())],
                            None => {
                                let made = self.launch(g, kernel, inputs, &values)?;
                                lits.insert(*id, made[0].1.clone());
                                made
                            }
                        }
                    }
                    Kernel::Node(id) => match self.donated_base(g, *id, inputs, prepared, k) {
                        Some(base) => {
                            self.update_donated(g, kernel, *id, base, inputs, &mut values)?
                        }
                        None => self.launch(g, kernel, inputs, &values)?,
                    },
                    _ => self.launch(g, kernel, inputs, &values)?,
                };
                for (id, h) in produced {
                    values.insert(id, h);
                }
                self.note_memory();
                for r in kernel.reads(g) {
                    if prepared.last_use.get(&r) == Some(&k) {
                        values.remove(&r);
                    }
                }
            }
            let mut out = Vec::with_capacity(prepared.outputs.len());
            for (name, id) in &prepared.outputs {
                let ty = g.ty(*id);
                let h = values.get(id).ok_or_else(|| DeviceError::Unsupported {
                    node: id.index(),
                    op: g.op(*id).name(),
                    message: "output never computed".into(),
                })?;
                let v = if to_host(name) {
                    Value::host(self.to_host_tensor(ty, h.clone())?)
                } else {
                    self.wrap(ty.clone(), h.clone())
                };
                out.push((name.clone(), v));
            }
            at.set(None);
            Ok(out)
        });
        match (result, at.get()) {
            (Ok(r), _) => r,
            (Err(DeviceError::Device(message)), Some(k)) => {
                let kernel = &prepared.fused.kernels[k];
                Err(DeviceError::Launch {
                    kernel: k,
                    kernels,
                    what: describe(g, kernel),
                    bytes: kernel_bytes(g, kernel),
                    message,
                })
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Runs one kernel; returns the buffers it wrote, bf16 results
    /// rounded to bf16.
    pub fn launch(
        &self,
        g: &Graph,
        kernel: &Kernel,
        inputs: &dyn Inputs,
        values: &HashMap<NodeId, Handle>,
    ) -> Result<Vec<(NodeId, Handle)>, DeviceError> {
        let made = self.launch_unrounded(g, kernel, inputs, values)?;
        Ok(self.round_bf16_results(g, kernel, made))
    }

    /// The bf16 results of `kernel` rounded to bf16, each into a new
    /// buffer (a result may share its buffer with an operand), unless the
    /// kernel rounds them itself.
    fn round_bf16_results(
        &self,
        g: &Graph,
        kernel: &Kernel,
        made: Vec<(NodeId, Handle)>,
    ) -> Vec<(NodeId, Handle)> {
        if rounds_bf16_itself(g, kernel) {
            return made;
        }
        made.into_iter()
            .map(|(id, h)| {
                if g.ty(id).dtype != DType::Bf16 {
                    return (id, h);
                }
                let n = g.ty(id).numel();
                let out = self.output(n);
                self.elementwise(&bf16_rounding(), n, &[(h, n)], std::slice::from_ref(&out));
                (id, out)
            })
            .collect()
    }

    /// [`Self::launch`] without rounding bf16 results.
    fn launch_unrounded(
        &self,
        g: &Graph,
        kernel: &Kernel,
        inputs: &dyn Inputs,
        values: &HashMap<NodeId, Handle>,
    ) -> Result<Vec<(NodeId, Handle)>, DeviceError> {
        let get = |id: &NodeId| -> Result<Handle, DeviceError> {
            values
                .get(id)
                .cloned()
                .ok_or_else(|| DeviceError::Unsupported {
                    node: id.index(),
                    op: g.op(*id).name(),
                    message: "operand not computed before its use".into(),
                })
        };
        let len = |id: &NodeId| g.ty(*id).numel();
        // Buffers of values with their lengths.
        let operands = |ids: &[NodeId]| -> Result<Vec<(Handle, usize)>, DeviceError> {
            ids.iter().map(|i| Ok((get(i)?, len(i)))).collect()
        };
        match kernel {
            Kernel::Elementwise {
                program,
                numel,
                inputs: ins,
                outputs,
            } => {
                let outs: Vec<Handle> = outputs.iter().map(|_| self.output(*numel)).collect();
                self.elementwise(program, *numel, &operands(ins)?, &outs);
                Ok(outputs.iter().copied().zip(outs).collect())
            }
            Kernel::Reduce { .. } => self.launch_reduce(kernel, &operands),
            Kernel::MatMul {
                id,
                a,
                b,
                trans_a,
                trans_b,
            } => {
                let shape = &g.ty(*id).shape;
                let r = shape.len();
                let (m, nn) = (shape[r - 2], shape[r - 1]);
                let k = g.ty(g.inputs(*id)[0]).shape[r - 1];
                let batch = numel(&shape[..r - 2]);
                let shape = MatmulShape {
                    batch,
                    m,
                    k,
                    n: nn,
                    trans_a: *trans_a,
                    trans_b: *trans_b,
                };
                Ok(vec![(*id, self.launch_product(&get(a)?, &get(b)?, shape))])
            }
            Kernel::LinearLogprob {
                id,
                h,
                w,
                targets,
                seq_out,
                seq_in,
            } => {
                let (vocab, d) = (g.ty(*w).shape[0], g.ty(*w).shape[1]);
                let shape = LogprobShape {
                    n: g.ty(*id).numel(),
                    d,
                    vocab,
                    seq_out: *seq_out,
                    seq_in: *seq_in,
                };
                let ops = [&get(h)?, &get(w)?, &get(targets)?];
                let (out, _) = self.launch_linear_logprob(ops, len(h), shape);
                Ok(vec![(*id, out)])
            }
            Kernel::Attention {
                id,
                q,
                k,
                v,
                kv_heads,
            } => {
                let shape = AttentionShape::of(&g.ty(*id).shape, *kv_heads);
                let (o, _) = self.launch_attention([&get(q)?, &get(k)?, &get(v)?], shape)?;
                Ok(vec![(*id, o)])
            }
            Kernel::AttentionGrads { .. } => self.launch_attention_grads(g, kernel, &get),
            Kernel::LogprobGrads { .. } => self.launch_logprob_grads(g, kernel, &get),
            Kernel::OptimStep {
                rule,
                numel,
                prologue_inputs,
                state,
                ..
            } => {
                let spec = StepSpec::of(kernel).expect("a step kernel");
                let (grad, state) = (operands(prologue_inputs)?, operands(state)?);
                let written = kernel.writes();
                let outs: Vec<Handle> = written.iter().map(|_| self.output(*numel)).collect();
                self.launch_optim_step(*rule, spec, *numel, &grad, &state, &outs);
                Ok(written.into_iter().zip(outs).collect())
            }
            Kernel::Node(id) => Ok(vec![(*id, self.node(g, *id, inputs, &get)?)]),
        }
    }

    /// A reduction with its fused prologue and epilogue, one cube or one
    /// unit per output as the fuser chose.
    fn launch_reduce(
        &self,
        kernel: &Kernel,
        operands: &dyn Fn(&[NodeId]) -> Result<Vec<(Handle, usize)>, DeviceError>,
    ) -> Result<Vec<(NodeId, Handle)>, DeviceError> {
        let Kernel::Reduce {
            kind,
            layout,
            split,
            prologue,
            prologue_inputs,
            epilogue,
            epilogue_inputs,
            outputs,
        } = kernel
        else {
            unreachable!("launch_reduce takes reductions");
        };
        let (n_out, n_red) = (layout.out_numel(), layout.red_numel());
        if n_red == 0 {
            return Err(DeviceError::Unsupported {
                node: outputs[0].index(),
                op: "reduce",
                message: "reduction over an empty axis".into(),
            });
        }
        let outs: Vec<Handle> = outputs.iter().map(|_| self.output(n_out)).collect();
        let (pro, epi) = (operands(prologue_inputs)?, operands(&epilogue_inputs[1..])?);
        let pro = sequence(pro.iter().map(|(h, n)| (h, *n)));
        let epi = sequence(epi.iter().map(|(h, n)| (h, *n)));
        let o = sequence(outs.iter().map(|h| (h, n_out)));
        let spec = ReduceSpec {
            kind: *kind,
            layout: layout.clone(),
            prologue: prologue.clone(),
            epilogue: epilogue.clone(),
        };
        if *split == ReduceSplit::CubePerOutput {
            reduce_program_rows::launch::<R>(
                &self.client,
                cubes(n_out),
                CubeDim::new_1d(BLOCK),
                pro,
                epi,
                o,
                n_out as u32,
                n_red as u32,
                spec,
                BLOCK as usize,
            );
        } else {
            reduce_program::launch::<R>(
                &self.client,
                cube_count(n_out),
                CubeDim::new_1d(BLOCK),
                pro,
                epi,
                o,
                n_out as u32,
                n_red as u32,
                spec,
            );
        }
        Ok(outputs.iter().copied().zip(outs).collect())
    }

    /// The gradients of one attention: the log-sum-exp pass, then the
    /// query-side and (when asked) key-side backward kernels.
    fn launch_attention_grads(
        &self,
        g: &Graph,
        kernel: &Kernel,
        get: &dyn Fn(&NodeId) -> Result<Handle, DeviceError>,
    ) -> Result<Vec<(NodeId, Handle)>, DeviceError> {
        let Kernel::AttentionGrads {
            inputs: ops,
            grads,
            kv_heads,
        } = kernel
        else {
            unreachable!("launch_attention_grads takes attention gradients");
        };
        let shape = AttentionShape::of(&g.ty(ops[0]).shape, *kv_heads);
        let [q, k, v, o, d_o] = [0, 1, 2, 3, 4].map(|i| get(&ops[i]));
        let (q, k, v, o, d_o) = (q?, k?, v?, o?, d_o?);
        // The log-sum-exp pass (no output); `o` is the graph's.
        let lse = self.launch_attention_lse([&q, &k, &v], shape)?;
        let kv = grads.iter().any(|(w, _)| *w != AttentionOperand::Q);
        let (dq, dkv) = self.launch_attention_backward([&q, &k, &v, &o, &lse, &d_o], shape, kv)?;
        Ok(grads
            .iter()
            .map(|&(wrt, id)| {
                let h = match (wrt, &dkv) {
                    (AttentionOperand::K, Some((dk, _))) => dk.clone(),
                    (AttentionOperand::V, Some((_, dv))) => dv.clone(),
                    _ => dq.clone(),
                };
                (id, h)
            })
            .collect())
    }

    /// The gradients of one linear log-prob: the forward for its
    /// log-sum-exp, then one pass over the vocabulary for both gradients.
    fn launch_logprob_grads(
        &self,
        g: &Graph,
        kernel: &Kernel,
        get: &dyn Fn(&NodeId) -> Result<Handle, DeviceError>,
    ) -> Result<Vec<(NodeId, Handle)>, DeviceError> {
        let Kernel::LogprobGrads {
            inputs: ops,
            grads,
            chunk,
        } = kernel
        else {
            unreachable!("launch_logprob_grads takes log-prob gradients");
        };
        let (rows, d) = (g.ty(ops[0]).shape[0], g.ty(ops[0]).shape[1]);
        let shape = LogprobShape {
            n: rows,
            d,
            vocab: g.ty(ops[1]).shape[0],
            seq_out: rows,
            seq_in: rows,
        };
        let [h, w, y, gr] = [0, 1, 2, 3].map(|i| get(&ops[i]));
        let (h, w, y, gr) = (h?, w?, y?, gr?);
        // The forward runs for its log-sum-exp.
        let (_, lse) = self.launch_linear_logprob([&h, &w, &y], rows * d, shape);
        // One pass over the vocabulary serves both gradients.
        let asked = |o| grads.iter().any(|&(wrt, _)| wrt == o);
        let want = [asked(LogprobOperand::Hidden), asked(LogprobOperand::Weight)];
        let ops = [&h, &w, &y, &lse, &gr];
        let [dh, dw] = self.launch_linear_logprob_backward(ops, shape, want, *chunk);
        Ok(grads
            .iter()
            .map(|&(wrt, id)| {
                let out = match wrt {
                    LogprobOperand::Hidden => dh.clone(),
                    LogprobOperand::Weight => dw.clone(),
                };
                (id, out.expect("computed when asked"))
            })
            .collect())
    }

    /// One optimiser step over `numel` elements: the gradient from `grad`
    /// by `spec.prologue`, then the rule on `state` (θ, buffers, step
    /// count), writing `outs` (`spec.writes`).
    fn launch_optim_step(
        &self,
        rule: StepRule,
        spec: StepSpec,
        numel: usize,
        grad: &[(Handle, usize)],
        state: &[(Handle, usize)],
        outs: &[Handle],
    ) {
        let gi = sequence(grad.iter().map(|(h, n)| (h, *n)));
        let o = sequence(outs.iter().map(|h| (h, numel)));
        let st = |i: usize| arg::<R>(&state[i].0, state[i].1);
        let (count, dim, n) = (cube_count(numel), CubeDim::new_1d(BLOCK), numel as u32);
        let f = |x: Scalar| x.get() as f32;
        match rule {
            StepRule::Sgd { lr } => {
                sgd_step::launch::<R>(&self.client, count, dim, gi, st(0), o, n, f(lr), spec)
            }
            StepRule::Momentum { lr, mu } => momentum_step::launch::<R>(
                &self.client,
                count,
                dim,
                gi,
                st(0),
                st(1),
                o,
                n,
                f(lr),
                f(mu),
                spec,
            ),
            StepRule::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                ..
            } => adamw_step::launch::<R>(
                &self.client,
                count,
                dim,
                gi,
                st(0),
                st(1),
                st(2),
                st(3),
                o,
                n,
                f(lr),
                f(beta1),
                (1.0 - beta1.get()) as f32,
                f(beta2),
                (1.0 - beta2.get()) as f32,
                f(eps),
                rule.decay().unwrap_or(1.0) as f32,
                spec,
            ),
        }
    }

    fn elementwise(
        &self,
        program: &ElemProgram,
        numel: usize,
        ins: &[(Handle, usize)],
        outs: &[Handle],
    ) {
        let i = sequence(ins.iter().map(|(h, n)| (h, *n)));
        let o = sequence(outs.iter().map(|h| (h, numel)));
        elementwise_program::launch::<R>(
            &self.client,
            cube_count(numel),
            CubeDim::new_1d(BLOCK),
            i,
            o,
            numel as u32,
            program.clone(),
        );
    }

    fn copy(&self, src: &Handle, src_len: usize, dst: &Handle, dst_len: usize, spec: CopySpec) {
        let n: usize = spec.shape.iter().map(|&d| d as usize).product();
        if n == 0 {
            return;
        }
        strided_copy::launch::<R>(
            &self.client,
            cube_count(n),
            CubeDim::new_1d(BLOCK),
            arg(src, src_len),
            arg(dst, dst_len),
            n as u32,
            spec,
        );
    }

    fn node(
        &self,
        g: &Graph,
        id: NodeId,
        inputs: &dyn Inputs,
        get: &dyn Fn(&NodeId) -> Result<Handle, DeviceError>,
    ) -> Result<Handle, DeviceError> {
        // Graphs with f64 nodes are refused before any kernel
        // (`Prepared::unsupported`).
        let ty = g.ty(id);
        let cx = NodeCx {
            g,
            id,
            n: ty.numel(),
            ops: g.inputs(id),
            inputs,
            get,
        };
        // One method per kernel family.
        match g.op(id) {
            Op::Input { .. } | Op::Literal { .. } | Op::Iota { .. } => self.source_node(&cx),
            Op::Reshape { .. }
            | Op::StopGradient
            | Op::Barrier { .. }
            | Op::AllReduceSum
            | Op::Permute { .. }
            | Op::Slice { .. }
            | Op::Pad { .. }
            | Op::Concat { .. }
            | Op::UpdateSlice { .. } => self.movement_node(&cx),
            Op::TakeAlongAxis { .. }
            | Op::ScatterAdd { .. }
            | Op::Gather
            | Op::ScatterAddRows { .. }
            | Op::OneHot { .. } => self.index_node(&cx),
            Op::RmsNorm { .. } | Op::RmsNormGrad { .. } | Op::Rope { .. } => self.norm_node(&cx),
            Op::CachedAttention => self.attention_node(&cx),
            Op::TokenLoss { .. } | Op::TokenLossGrad { .. } => self.loss_node(&cx),
            Op::LinearEntropy | Op::LinearEntropyGrad { .. } => self.entropy_node(&cx),
            other => Err(cx.unsupported(format!(
                "`{}` has no device kernel outside a fused group",
                other.name()
            ))),
        }
    }

    /// Graph inputs, literals and iotas: values that come from outside or from nothing.
    fn source_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id, n) = (cx.g, cx.id, cx.n);
        let ty = g.ty(id);
        let u = |v: usize| v as u32;
        let inputs = cx.inputs;
        Ok(match g.op(id) {
            Op::Input { name, ty } => {
                let input = inputs
                    .input(name)
                    .ok_or_else(|| DeviceError::MissingInput(name.clone()))?;
                let got = match input {
                    Input::Host(t) => t.ty(),
                    Input::Device(d) => d.ty.clone(),
                };
                let whole = match input {
                    Input::Host(t) => t.data.len() == t.numel(),
                    Input::Device(d) => self.unwrap_resident(d)?.numel == d.ty.numel(),
                };
                if got != *ty || !whole {
                    return Err(DeviceError::InputMismatch {
                        name: name.clone(),
                        expected: ty.to_string(),
                        got: got.to_string(),
                    });
                }
                match input {
                    Input::Host(t) => self.upload_host(t),
                    // Already on the device: no copy.
                    Input::Device(d) => self.unwrap_resident(d)?.handle.clone(),
                }
            }
            Op::Literal { values, .. } => {
                let v: Vec<f32> = values.iter().map(|s| s.get() as f32).collect();
                self.upload(&v)
            }
            Op::Iota { axis, .. } => {
                let h = self.output(n);
                let inner = numel(&ty.shape[axis + 1..]);
                iota::launch::<R>(
                    &self.client,
                    cube_count(n),
                    CubeDim::new_1d(BLOCK),
                    arg(&h, n),
                    u(n),
                    u(ty.shape[*axis]),
                    u(inner.max(1)),
                );
                h
            }
            other => return Err(cx.unsupported(format!("`{}` is not a source op", other.name()))),
        })
    }

    /// Data movement: relabelings share their operand's buffer; permutes, slices, pads and concatenations are strided copies; a slice update copies and writes.
    fn movement_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id, n) = (cx.g, cx.id, cx.n);
        let ops = &cx.ops;
        let in_len = |i: usize| cx.in_len(i);
        let get = cx.get;
        Ok(match g.op(id) {
            // Relabelings share the operand's buffer.
            Op::Reshape { .. } | Op::StopGradient | Op::Barrier { .. } => get(&ops[0])?,
            // A sum over processes: in device memory where the device has
            // an NCCL communicator; else the identity in one process, and
            // through the host and the process's collective in several.
            Op::AllReduceSum => {
                let collective = |source| DeviceError::Collective {
                    node: id.index(),
                    source,
                };
                let c = coopc_runtime::collective::current();
                if let Some(sum) = &self.device_sum {
                    let h = self.output(n);
                    sum.sum(&self.client, &get(&ops[0])?, &h, n)
                        .map_err(collective)?;
                    h
                } else if c.world() == 1 {
                    get(&ops[0])?
                } else {
                    let mut v = self.download(get(&ops[0])?, n)?;
                    c.all_reduce_sum_f32(&mut v).map_err(collective)?;
                    self.upload(&v)
                }
            }
            Op::Permute { .. } | Op::Slice { .. } | Op::Pad { .. } | Op::Concat { .. } => {
                let h = self.output(n);
                if let Op::Pad { value, .. } = g.op(id) {
                    self.elementwise(
                        &ElemProgram::constant(value.get()),
                        n,
                        &[],
                        std::slice::from_ref(&h),
                    );
                }
                let specs = CopySpec::for_node(g, id).expect("a strided-copy op");
                for (i, spec) in specs.into_iter().enumerate() {
                    self.copy(&get(&ops[i])?, in_len(i), &h, n, spec);
                }
                h
            }
            Op::UpdateSlice { .. } => {
                let h = self.output(n);
                self.elementwise(
                    &ElemProgram::load(),
                    n,
                    &[(get(&ops[0])?, n)],
                    std::slice::from_ref(&h),
                );
                self.launch_write_slice(g, id, &get(&ops[1])?, &get(&ops[2])?, &h);
                h
            }
            other => {
                return Err(cx.unsupported(format!("`{}` is not a data-movement op", other.name())))
            }
        })
    }

    /// Indexing: take-along-axis and its scatter, row gathers and their scatter, one-hot.
    fn index_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id, n) = (cx.g, cx.id, cx.n);
        let ops = &cx.ops;
        let in_len = |i: usize| cx.in_len(i);
        let u = |v: usize| v as u32;
        let get = cx.get;
        Ok(match g.op(id) {
            Op::TakeAlongAxis { axis } => {
                let xs = &g.ty(ops[0]).shape;
                let is = &g.ty(ops[1]).shape;
                let h = self.output(n);
                take_along::launch::<R>(
                    &self.client,
                    cube_count(n),
                    CubeDim::new_1d(BLOCK),
                    arg(&get(&ops[0])?, in_len(0)),
                    arg(&get(&ops[1])?, in_len(1)),
                    arg(&h, n),
                    u(n),
                    u(xs[*axis]),
                    u(is[*axis]),
                    u(numel(&xs[axis + 1..]).max(1)),
                );
                h
            }
            Op::ScatterAdd { axis } => {
                let xs = &g.ty(ops[0]).shape;
                let is = &g.ty(ops[1]).shape;
                let h = self.output(n);
                scatter_add_along::launch::<R>(
                    &self.client,
                    cube_count(n),
                    CubeDim::new_1d(BLOCK),
                    arg(&get(&ops[0])?, in_len(0)),
                    arg(&get(&ops[1])?, in_len(1)),
                    arg(&get(&ops[2])?, in_len(2)),
                    arg(&h, n),
                    u(n),
                    u(xs[*axis]),
                    u(is[*axis]),
                    u(numel(&xs[axis + 1..]).max(1)),
                );
                h
            }
            Op::Gather => {
                let table = &g.ty(ops[0]).shape;
                let row_len = numel(&table[1..]).max(1);
                let h = self.output(n);
                gather_rows::launch::<R>(
                    &self.client,
                    cube_count(n),
                    CubeDim::new_1d(BLOCK),
                    arg(&get(&ops[0])?, in_len(0)),
                    arg(&get(&ops[1])?, in_len(1)),
                    arg(&h, n),
                    u(n),
                    u(table[0]),
                    u(row_len),
                );
                h
            }
            Op::ScatterAddRows { rows } => {
                let n_ids = in_len(0);
                let row_len = n / rows.max(&1);
                let h = self.output(n);
                scatter_add_rows::launch::<R>(
                    &self.client,
                    cubes(*rows),
                    CubeDim::new_1d(BLOCK),
                    arg(&get(&ops[0])?, n_ids),
                    arg(&get(&ops[1])?, in_len(1)),
                    arg(&h, n),
                    u(*rows),
                    u(n_ids),
                    u(row_len.max(1)),
                    BLOCK as usize,
                );
                h
            }
            Op::OneHot { depth, .. } => {
                let h = self.output(n);
                one_hot::launch::<R>(
                    &self.client,
                    cube_count(n),
                    CubeDim::new_1d(BLOCK),
                    arg(&get(&ops[0])?, in_len(0)),
                    arg(&h, n),
                    u(n),
                    u(*depth),
                );
                h
            }
            other => {
                return Err(cx.unsupported(format!("`{}` is not an indexing op", other.name())))
            }
        })
    }

    /// Per-row transforms: RMSNorm, its gradients, RoPE.
    fn norm_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id, n) = (cx.g, cx.id, cx.n);
        let ops = &cx.ops;
        let in_len = |i: usize| cx.in_len(i);
        let u = |v: usize| v as u32;
        let get = cx.get;
        Ok(match g.op(id) {
            Op::RmsNorm { eps } => {
                let d = g.ty(ops[1]).numel();
                let rows = n / d;
                let h = self.output(n);
                rms_norm_forward::launch::<R>(
                    &self.client,
                    cubes(rows),
                    CubeDim::new_1d(NORM_BLOCK as u32),
                    arg(&get(&ops[0])?, n),
                    arg(&get(&ops[1])?, d),
                    arg(&h, n),
                    u(rows),
                    u(d),
                    eps.get() as f32,
                    NORM_BLOCK,
                );
                h
            }
            Op::RmsNormGrad { wrt, eps } => {
                let (d, len) = (g.ty(ops[1]).numel(), in_len(0));
                let rows = len / d;
                let eps = eps.get() as f32;
                let [x, w, dy] = [0, 1, 2].map(|i| get(&ops[i]));
                let (x, w, dy) = (x?, w?, dy?);
                let h = self.output(n);
                match wrt {
                    NormOperand::Input => rms_norm_backward_x::launch::<R>(
                        &self.client,
                        cubes(rows),
                        CubeDim::new_1d(NORM_BLOCK as u32),
                        arg(&x, len),
                        arg(&w, d),
                        arg(&dy, len),
                        arg(&h, n),
                        u(rows),
                        u(d),
                        eps,
                        NORM_BLOCK,
                    ),
                    NormOperand::Weight => {
                        let r = self.output(rows);
                        rms_norm_inv_rms::launch::<R>(
                            &self.client,
                            cubes(rows),
                            CubeDim::new_1d(NORM_BLOCK as u32),
                            arg(&x, len),
                            arg(&r, rows),
                            u(rows),
                            u(d),
                            eps,
                            NORM_BLOCK,
                        );
                        rms_norm_backward_w::launch::<R>(
                            &self.client,
                            cubes(d.div_ceil(NORM_COLS)),
                            CubeDim::new_2d(NORM_COLS as u32, NORM_LANES as u32),
                            arg(&x, len),
                            arg(&dy, len),
                            arg(&r, rows),
                            arg(&h, n),
                            u(rows),
                            u(d),
                            NORM_COLS,
                            NORM_LANES,
                        );
                    }
                }
                h
            }
            Op::Rope { transpose } => {
                let table = &g.ty(ops[1]).shape;
                let h = self.output(n);
                rope::launch::<R>(
                    &self.client,
                    cube_count(n),
                    CubeDim::new_1d(BLOCK),
                    arg(&get(&ops[0])?, in_len(0)),
                    arg(&get(&ops[1])?, in_len(1)),
                    arg(&get(&ops[2])?, in_len(2)),
                    arg(&h, n),
                    u(n),
                    u(table[0]),
                    u(table[1]),
                    *transpose,
                );
                h
            }
            other => {
                return Err(cx.unsupported(format!(
                    "`{}` is not a normalisation or RoPE op",
                    other.name()
                )))
            }
        })
    }

    /// Attention of the decode step over its cache.
    fn attention_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id, n) = (cx.g, cx.id, cx.n);
        let ops = &cx.ops;
        let in_len = |i: usize| cx.in_len(i);
        let get = cx.get;
        let unsupported = |message: String| cx.unsupported(message);
        Ok(match g.op(id) {
            Op::CachedAttention => {
                let (qs, ks) = (&g.ty(ops[0]).shape, &g.ty(ops[1]).shape);
                let (rows, hd) = (qs[0] * qs[1], qs[3]);
                if hd > CACHED_BLOCK {
                    return Err(unsupported(format!(
                        "cached attention with head dim {hd} (at most {CACHED_BLOCK})"
                    )));
                }
                let h = self.output(n);
                cached_attention::launch::<R>(
                    &self.client,
                    cubes(rows),
                    CubeDim::new_1d(CACHED_BLOCK as u32),
                    arg(&get(&ops[0])?, in_len(0)),
                    arg(&get(&ops[1])?, in_len(1)),
                    arg(&get(&ops[2])?, in_len(2)),
                    arg(&get(&ops[3])?, 1),
                    arg(&h, n),
                    rows as u32,
                    qs[1] as u32,
                    ks[1] as u32,
                    ks[2] as u32,
                    hd as u32,
                    (1.0 / (hd as f64).sqrt()) as f32,
                    CACHED_BLOCK,
                    CACHED_CHUNK,
                );
                h
            }
            other => {
                return Err(cx.unsupported(format!("`{}` is not an attention op", other.name())))
            }
        })
    }

    /// The linear entropy, and its gradient with respect to h or w (which
    /// runs the forward again for the rows' entropy and log-sum-exp).
    fn entropy_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id) = (cx.g, cx.id);
        let ops = &cx.ops;
        let (h, w) = (g.ty(ops[0]), g.ty(ops[1]));
        let shape = LogprobShape::tokens(h.shape[0], h.shape[1], w.shape[0]);
        let (hb, wb) = ((cx.get)(&ops[0])?, (cx.get)(&ops[1])?);
        let chunk = coopc_ir::kernel::device_chunk(shape.n, shape.vocab);
        let (entropy, lse) = self.launch_linear_entropy([&hb, &wb], shape, chunk);
        Ok(match g.op(id) {
            Op::LinearEntropy => entropy,
            Op::LinearEntropyGrad { wrt } => {
                let gb = (cx.get)(&ops[2])?;
                let want = [
                    *wrt == LogprobOperand::Hidden,
                    *wrt == LogprobOperand::Weight,
                ];
                let bufs = [&hb, &wb, &entropy, &lse, &gb];
                let [dh, dw] = self.launch_linear_entropy_backward(bufs, shape, want, chunk);
                dh.or(dw).expect("the gradient asked for")
            }
            other => return Err(cx.unsupported(format!("`{}` is not an entropy op", other.name()))),
        })
    }

    /// The GRPO and SFT token losses and their gradients.
    fn loss_node(&self, cx: &NodeCx<'_>) -> Result<Handle, DeviceError> {
        let (g, id, n) = (cx.g, cx.id, cx.n);
        let ops = &cx.ops;
        let in_len = |i: usize| cx.in_len(i);
        let u = |v: usize| v as u32;
        let get = cx.get;
        Ok(match g.op(id) {
            Op::TokenLoss { loss } | Op::TokenLossGrad { loss } => {
                let lp = &g.ty(ops[0]).shape;
                let (rows, cols) = (lp[0], lp[1]);
                let bufs = (0..ops.len())
                    .map(|i| get(&ops[i]).map(|h| (h, in_len(i))))
                    .collect::<Result<Vec<_>, _>>()?;
                // SFT reads no old, A or ref and GRPO without KL no ref:
                // logπ stands in for the arrays not read.
                let at = |i: usize| {
                    let (h, len) = if i < loss.arity() { &bufs[i] } else { &bufs[0] };
                    arg(h, *len)
                };
                let (spec, [lo, hi, beta, scale]) =
                    (LossSpec::of(*loss), LossSpec::hyper(*loss, rows));
                let h = self.output(n);
                let block = CubeDim::new_1d(LOSS_BLOCK as u32);
                if let Op::TokenLoss { .. } = g.op(id) {
                    token_loss::launch::<R>(
                        &self.client,
                        cubes(1),
                        block,
                        at(0),
                        at(1),
                        at(2),
                        at(3),
                        at(4),
                        arg(&h, n),
                        u(rows),
                        u(cols),
                        lo,
                        hi,
                        beta,
                        scale,
                        spec,
                        LOSS_BLOCK,
                    );
                } else {
                    let gout = &bufs[loss.arity()];
                    token_loss_grad::launch::<R>(
                        &self.client,
                        cubes(rows),
                        block,
                        at(0),
                        at(1),
                        at(2),
                        at(3),
                        at(4),
                        arg(&gout.0, 1),
                        arg(&h, n),
                        u(rows),
                        u(cols),
                        lo,
                        hi,
                        beta,
                        scale,
                        spec,
                        LOSS_BLOCK,
                    );
                }
                h
            }
            other => {
                return Err(cx.unsupported(format!("`{}` is not a token-loss op", other.name())))
            }
        })
    }
}

/// A node launched by itself: its graph, operands and element count, where
/// its inputs and operand buffers come from.
struct NodeCx<'a> {
    g: &'a Graph,
    id: NodeId,
    n: usize,
    ops: Vec<NodeId>,
    inputs: &'a dyn Inputs,
    get: &'a dyn Fn(&NodeId) -> Result<Handle, DeviceError>,
}

impl NodeCx<'_> {
    /// Elements of operand `i`.
    fn in_len(&self, i: usize) -> usize {
        self.g.ty(self.ops[i]).numel()
    }

    fn unsupported(&self, message: String) -> DeviceError {
        DeviceError::Unsupported {
            node: self.id.index(),
            op: self.g.op(self.id).name(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_with_too_little_shared_memory_is_refused_by_name() {
        assert!(check_shared_memory("wgpu", 32 * 1024).is_ok());
        assert!(check_shared_memory("wgpu", SHARED_BYTES_NEEDED).is_ok());
        let e = check_shared_memory("wgpu", 16 * 1024)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wgpu backend is not available")
                && e.contains("16384 bytes of shared memory")
                && e.contains(&SHARED_BYTES_NEEDED.to_string()),
            "{e}"
        );
    }
}

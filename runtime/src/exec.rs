//! The reference executor: runs a validated graph on host tensors, node by
//! node in topological order, with the semantics documented on `Op`. Only
//! the nodes the requested results depend on are evaluated, and each
//! intermediate buffer is dropped right after its last use.

use crate::cpu::index::IndexError;
use crate::cpu::{
    attention, elementwise, index, linear_logprob, losses, matmul, movement, optim, reduce,
    rms_norm, rope,
};
use crate::error::ExecError;
use crate::tensor::{Buffer, Element, HostTensor};
use crate::value::{Input, Inputs, Transfers, Value};
use coopc_ir::plan::Program;
use coopc_ir::{execution_order, numel, DType, Graph, NodeId, Op, TensorType};
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

/// Runs `graph` and returns its outputs (`graph.outputs()`), in order, by
/// name.
///
/// Inputs are bound to `Op::Input` nodes by name; names the graph does not
/// use are ignored, and an input the outputs do not depend on need not be
/// given.
pub fn execute<I: Inputs + ?Sized>(
    graph: &Graph,
    inputs: &I,
) -> Result<Vec<(String, HostTensor)>, ExecError> {
    let nodes = output_nodes(graph);
    let values = execute_nodes(graph, inputs, &nodes)?;
    Ok(named_outputs(graph, values))
}

/// The nodes of `graph`'s outputs, in order.
fn output_nodes(graph: &Graph) -> Vec<NodeId> {
    graph.outputs().iter().map(|&(_, id)| id).collect()
}

/// The outputs' values by name, from their values in output order.
fn named_outputs(graph: &Graph, values: Vec<HostTensor>) -> Vec<(String, HostTensor)> {
    graph
        .outputs()
        .iter()
        .map(|(name, _)| name.clone())
        .zip(values)
        .collect()
}

/// Something that runs a plan's compiled programs on host inputs and
/// returns host outputs: the CPU executor, or a device backend
/// (`coopc_kernels`). The trainer and the sampler run every program
/// through one. A backend reads what the program holds — its schedule, its
/// fused kernels — and orders, schedules and fuses nothing itself.
pub trait Backend: Send + Sync {
    /// Short name, as `--backend` spells it.
    fn name(&self) -> &'static str;

    /// Runs `program` and returns its outputs by name, as [`execute`] does.
    fn run(
        &self,
        program: &Program,
        inputs: &HashMap<String, HostTensor>,
    ) -> Result<Vec<(String, HostTensor)>, ExecError>;

    /// Runs `program` on values, some of which may already live on this
    /// backend's device. Outputs named by `to_host` come back as host
    /// tensors; a device backend keeps the others resident, so that state
    /// passed from one call to the next never leaves the device.
    fn run_values(
        &self,
        program: &Program,
        inputs: &HashMap<String, Value>,
        to_host: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Value)>, ExecError> {
        let _ = to_host;
        Ok(execute_program(program, inputs)?
            .into_iter()
            .map(|(n, t)| (n, Value::host(t)))
            .collect())
    }

    /// A value as a host tensor (a device value is read back).
    fn to_host(&self, value: &Value) -> Result<HostTensor, ExecError> {
        match value {
            Value::Host(t) => Ok((**t).clone()),
            Value::Device(d) => Err(ExecError::Device(format!(
                "a value of type {} lives on the {} device, not on the {} backend",
                d.ty,
                d.backend,
                self.name()
            ))),
        }
    }

    /// A value as this backend keeps state between calls: a device backend
    /// copies a host value to the device (once); the CPU keeps it as is.
    fn resident(&self, value: Value) -> Result<Value, ExecError> {
        Ok(value)
    }

    /// A zero tensor of type `ty`, made where this backend keeps state.
    fn zeros(&self, ty: &TensorType) -> Result<Value, ExecError> {
        Ok(Value::host(HostTensor::zeros(ty)))
    }

    /// Whether [`Backend::sample_tokens`] draws tokens where the logits
    /// are (a device backend), so the sampler need not read them back.
    fn samples_tokens(&self) -> bool {
        false
    }

    /// One token per row of `logits` (`[rows, vocab]`, held by this
    /// backend) by the rule of `sampler::choose_token`, with `draws[r]` the
    /// row's uniform number in [0, 1) (unused when greedy); `None` for a row
    /// with a non-finite logit. Only backends whose
    /// [`Backend::samples_tokens`] is true implement it.
    fn sample_tokens(
        &self,
        logits: &Value,
        draws: &[f64],
        temperature: f64,
        top_p: f64,
        greedy: bool,
    ) -> Result<Vec<Option<i32>>, ExecError> {
        let _ = (logits, draws, temperature, top_p, greedy);
        Err(ExecError::Device(format!(
            "the {} backend draws tokens on the host",
            self.name()
        )))
    }

    /// Bytes copied between host and device so far; `None` for the CPU.
    fn transfers(&self) -> Option<Transfers> {
        None
    }

    /// Starts (or stops) recording the most device memory in use: a
    /// device backend samples its allocator after every kernel while on.
    fn track_memory(&self, on: bool) {
        let _ = on;
    }

    /// The most bytes of device buffers in use at once since
    /// [`Backend::track_memory`] turned recording on; `None` for the CPU.
    fn memory_peak(&self) -> Option<u64> {
        None
    }
}

/// The CPU reference executor as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn run(
        &self,
        program: &Program,
        inputs: &HashMap<String, HostTensor>,
    ) -> Result<Vec<(String, HostTensor)>, ExecError> {
        execute_program(program, inputs)
    }
}

/// Runs the part of `graph` that `nodes` depend on and returns the value of
/// each of `nodes`, in order (a node may be listed more than once).
pub fn execute_nodes<I: Inputs + ?Sized>(
    graph: &Graph,
    inputs: &I,
    nodes: &[NodeId],
) -> Result<Vec<HostTensor>, ExecError> {
    graph.validate()?;
    if let Some(&id) = nodes.iter().find(|&&id| !graph.contains(id)) {
        return Err(ExecError::UnknownNode { node: id.index() });
    }
    run_steps(graph, inputs, nodes, Steps::new(graph, nodes, None))
}

/// Runs a compiled program and returns its outputs by name: on its fused
/// kernels ([`crate::fused_cpu`]), or node by node in the plan's schedule
/// ([`execute_program_nodes`]) where the fused kernels cannot run on the
/// CPU as such or `COOPC_CPU_FUSED=0` asks for it. The two give the same
/// values bit for bit.
pub fn execute_program<I: Inputs + ?Sized>(
    program: &Program,
    inputs: &I,
) -> Result<Vec<(String, HostTensor)>, ExecError> {
    if std::env::var_os("COOPC_CPU_FUSED").is_some_and(|v| v == "0") {
        return execute_program_nodes(program, inputs);
    }
    match crate::fused_cpu::FusedPlan::new(program) {
        Ok(plan) => plan.run(inputs),
        Err(_) => execute_program_nodes(program, inputs),
    }
}

/// Runs a compiled program node by node, in the plan's schedule, and
/// returns its outputs by name (the reference the fused execution is
/// checked against). The graph was validated when the plan was; nothing is
/// ordered or checked here beyond the inputs.
pub fn execute_program_nodes<I: Inputs + ?Sized>(
    program: &Program,
    inputs: &I,
) -> Result<Vec<(String, HostTensor)>, ExecError> {
    let graph = &program.graph;
    let nodes = output_nodes(graph);
    let steps = Steps::new(graph, &nodes, Some(&program.schedule));
    let values = run_steps(graph, inputs, &nodes, steps)?;
    Ok(named_outputs(graph, values))
}

/// Evaluates `plan.order` and returns the values of `nodes`, in order.
fn run_steps<I: Inputs + ?Sized>(
    graph: &Graph,
    inputs: &I,
    nodes: &[NodeId],
    plan: Steps,
) -> Result<Vec<HostTensor>, ExecError> {
    // COOPC_PROFILE=1: time spent per op kind, printed to stderr;
    // COOPC_PROFILE=shapes: matrix products also by shape.
    let profile_mode = std::env::var("COOPC_PROFILE").ok();
    let by_shape = profile_mode.as_deref() == Some("shapes");
    let mut profile: Option<HashMap<String, (usize, f64, usize)>> =
        profile_mode.map(|_| HashMap::new());

    // Node index → value. Graph inputs are borrowed, everything else owned.
    let mut values: Vec<Option<Cow<'_, HostTensor>>> = (0..plan.bound).map(|_| None).collect();
    for (step, &id) in plan.order.iter().enumerate() {
        let operands = &plan.operands[step];
        let value = match graph.op(id) {
            Op::Input { .. } => Cow::Borrowed(bind_input(graph, id, inputs)?),
            // Pure relabelings: reuse the operand's buffer when this is its
            // last use.
            Op::Reshape { .. } | Op::StopGradient | Op::Barrier { .. }
                if plan.dies_at(operands[0], step) =>
            {
                let mut t = values[operands[0].index()]
                    .take()
                    .ok_or_else(|| missing_operand(graph, id))?
                    .into_owned();
                t.shape = graph.ty(id).shape.clone();
                Cow::Owned(t)
            }
            _ => {
                let args = operands
                    .iter()
                    .map(|o| values[o.index()].as_deref())
                    .collect::<Option<Vec<&HostTensor>>>()
                    .ok_or_else(|| missing_operand(graph, id))?;
                let t0 = profile.is_some().then(Instant::now);
                let v = match plan.transposed[step] {
                    [false, false] => eval(graph, id, &args)?,
                    [a_t, b_t] => matmul_transposed(graph, id, &args, a_t, b_t)?,
                };
                if let (Some(p), Some(t0)) = (profile.as_mut(), t0) {
                    let key = profile_key(graph, id, plan.transposed[step], by_shape);
                    let e = p.entry(key).or_default();
                    e.0 += 1;
                    e.1 += t0.elapsed().as_secs_f64();
                    e.2 += graph.ty(id).numel();
                }
                Cow::Owned(v)
            }
        };
        values[id.index()] = Some(value);
        for &o in operands {
            if plan.dies_at(o, step) {
                values[o.index()] = None;
            }
        }
    }

    if let Some(p) = profile {
        print_profile(p);
    }

    // Hand out the requested values, moving each on its last mention.
    let mut mentions: HashMap<NodeId, usize> = HashMap::new();
    for &id in nodes {
        *mentions.entry(id).or_default() += 1;
    }
    let mut out = Vec::with_capacity(nodes.len());
    for &id in nodes {
        let left = mentions.entry(id).or_default();
        *left -= 1;
        let slot = &mut values[id.index()];
        let t = if *left == 0 {
            slot.take().map(Cow::into_owned)
        } else {
            slot.as_deref().cloned()
        };
        out.push(t.ok_or_else(|| missing_operand(graph, id))?);
    }
    Ok(out)
}

/// The row of the `COOPC_PROFILE` table node `id` counts in: its op's
/// name, and with `by_shape` a matrix product's `[batch ×] m×k×n` and which
/// operands it reads transposed.
pub(crate) fn profile_key(
    graph: &Graph,
    id: NodeId,
    transposed: [bool; 2],
    by_shape: bool,
) -> String {
    let name = graph.op(id).name();
    if !by_shape || !matches!(graph.op(id), Op::MatMul) {
        return name.to_string();
    }
    let out = &graph.ty(id).shape;
    let r = out.len();
    let k = graph.ty(graph.inputs(id)[0]).shape[r - 1];
    let batch = numel(&out[..r - 2]);
    let t = match transposed {
        [false, false] => "",
        [true, false] => " Aᵀ",
        [false, true] => " Bᵀ",
        [true, true] => " AᵀBᵀ",
    };
    format!("{name} {batch}×{}×{k}×{}{t}", out[r - 2], out[r - 1])
}

/// The `COOPC_PROFILE` table: op kinds by time spent, with call counts and
/// result elements.
pub(crate) fn print_profile(p: HashMap<String, (usize, f64, usize)>) {
    let total: f64 = p.values().map(|v| v.1).sum();
    let mut rows: Vec<_> = p.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    eprintln!("coopc profile: {:.3} ms in ops", total * 1e3);
    for (op, (calls, secs, elems)) in rows {
        eprintln!(
            "  {op:<30} {:>9.3} ms {:>5.1}%  {calls:>6} calls  {:>12} elements",
            secs * 1e3,
            100.0 * secs / total.max(1e-12),
            elems
        );
    }
}

/// What to evaluate, in which order, and when each value can be dropped.
struct Steps {
    /// One past the largest node index.
    bound: usize,
    /// The needed nodes in topological order.
    order: Vec<NodeId>,
    /// Operands (in slot order) of `order[step]`.
    operands: Vec<Vec<NodeId>>,
    /// Node index → the step of its last use, `usize::MAX` when unused.
    last_use: Vec<usize>,
    /// Node index → requested by the caller (never dropped).
    requested: Vec<bool>,
    /// Per step of a matmul: whether its lhs / rhs operand is the buffer of
    /// a skipped last-two-axes permute, read transposed.
    transposed: Vec<[bool; 2]>,
}

impl Steps {
    /// The steps that compute `nodes`: in `schedule`'s order (a compiled
    /// program's), or else in [`execution_order`].
    fn new(graph: &Graph, nodes: &[NodeId], schedule: Option<&[NodeId]>) -> Steps {
        let bound = graph.node_ids().map(|id| id.index() + 1).max().unwrap_or(0);
        let mut requested = vec![false; bound];
        let mut needed = vec![false; bound];
        let mut stack: Vec<NodeId> = Vec::new();
        for &id in nodes {
            requested[id.index()] = true;
            if !needed[id.index()] {
                needed[id.index()] = true;
                stack.push(id);
            }
        }
        while let Some(id) = stack.pop() {
            for o in graph.inputs(id) {
                if !needed[o.index()] {
                    needed[o.index()] = true;
                    stack.push(o);
                }
            }
        }
        // A transpose that only matmuls read is never materialised: they
        // read its operand's buffer through transposed strides.
        let skipped: Vec<bool> = (0..bound)
            .map(|i| {
                let id = NodeId::new(i);
                needed[i]
                    && !requested[i]
                    && graph.op(id).is_matrix_transpose()
                    && graph
                        .users(id)
                        .iter()
                        .filter(|u| needed[u.index()])
                        .all(|&u| matches!(graph.op(u), Op::MatMul))
            })
            .collect();
        let order: Vec<NodeId> = match schedule {
            Some(order) => order
                .iter()
                .copied()
                .filter(|id| needed[id.index()] && !skipped[id.index()])
                .collect(),
            None => execution_order(graph, &needed)
                .into_iter()
                .filter(|id| !skipped[id.index()])
                .collect(),
        };
        let mut transposed = vec![[false; 2]; order.len()];
        let operands: Vec<Vec<NodeId>> = order
            .iter()
            .enumerate()
            .map(|(step, &id)| {
                let mut ops = graph.inputs(id);
                for (slot, o) in ops.iter_mut().enumerate() {
                    if skipped[o.index()] {
                        transposed[step][slot] = true;
                        *o = graph.inputs(*o)[0];
                    }
                }
                ops
            })
            .collect();
        let mut last_use = vec![usize::MAX; bound];
        for (step, ops) in operands.iter().enumerate() {
            for o in ops {
                last_use[o.index()] = step;
            }
        }
        Steps {
            bound,
            order,
            operands,
            last_use,
            requested,
            transposed,
        }
    }

    /// Whether the value of `id` is no longer needed after `step`.
    fn dies_at(&self, id: NodeId, step: usize) -> bool {
        self.last_use[id.index()] == step && !self.requested[id.index()]
    }
}

/// The input bound to `Op::Input` node `id`, checked against its type.
pub(crate) fn bind_input<'i, I: Inputs + ?Sized>(
    graph: &Graph,
    id: NodeId,
    inputs: &'i I,
) -> Result<&'i HostTensor, ExecError> {
    let Op::Input { name, ty } = graph.op(id) else {
        return Err(missing_operand(graph, id));
    };
    let t = match inputs.input(name) {
        Some(Input::Host(t)) => t,
        Some(Input::Device(d)) => {
            return Err(ExecError::Device(format!(
                "input `{name}` lives on the {} device; the CPU executor needs it on the host",
                d.backend
            )))
        }
        None => {
            return Err(ExecError::MissingInput {
                name: name.clone(),
                expected: ty.clone(),
            })
        }
    };
    if t.dtype() != ty.dtype || t.shape != ty.shape || t.data.len() != ty.numel() {
        let mut got = t.ty().to_string();
        if t.data.len() != t.numel() {
            got += &format!(" holding {} elements", t.data.len());
        }
        return Err(ExecError::InputMismatch {
            name: name.clone(),
            expected: ty.clone(),
            got,
        });
    }
    Ok(t)
}

pub(crate) fn missing_operand(graph: &Graph, id: NodeId) -> ExecError {
    ExecError::Unsupported {
        node: id.index(),
        op: graph.op(id).name(),
        message: "an operand value is missing (executor bug)".into(),
    }
}

/// The node being evaluated, for error messages.
struct Cx {
    node: usize,
    op: &'static str,
}

impl Cx {
    /// The elements of an operand as `T`.
    fn view<'t, T: Element>(&self, t: &'t HostTensor) -> Result<&'t [T], ExecError> {
        T::view(&t.data).ok_or_else(|| ExecError::Unsupported {
            node: self.node,
            op: self.op,
            message: format!("expected a {} operand, got {}", T::DTYPE, t.dtype()),
        })
    }

    fn unsupported(&self, dtype: DType) -> ExecError {
        ExecError::Unsupported {
            node: self.node,
            op: self.op,
            message: format!("element type {dtype} is not supported"),
        }
    }

    fn index(&self, e: IndexError) -> ExecError {
        ExecError::IndexOutOfRange {
            node: self.node,
            op: self.op,
            index: e.index,
            bound: e.bound,
        }
    }
}

/// Evaluates `body` with `$T` bound to the Rust type of the dtype.
macro_rules! any_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            // bf16 values are held as f32 and computed on as f32.
            DType::Bf16 => {
                type $T = f32;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::Bool => {
                type $T = bool;
                $body
            }
        }
    };
}
pub(crate) use any_dtype;

/// As `any_dtype`, for ops defined on floats only; other dtypes are an error.
macro_rules! float_dtype {
    ($dtype:expr, $cx:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::Bf16 => {
                type $T = f32;
                $body
            }
            other => return Err($cx.unsupported(other)),
        }
    };
}

/// A matmul whose operands are given as stored: `a_t` / `b_t` mark one that
/// is the buffer of the logical operand's last-two-axes transpose.
pub(crate) fn matmul_transposed(
    graph: &Graph,
    id: NodeId,
    args: &[&HostTensor],
    a_t: bool,
    b_t: bool,
) -> Result<HostTensor, ExecError> {
    let cx = Cx {
        node: id.index(),
        op: "matmul",
    };
    let out = graph.ty(id);
    let r = out.rank();
    let lhs = graph.ty(graph.inputs(id)[0]);
    let (m, k, n) = (out.shape[r - 2], lhs.shape[r - 1], out.shape[r - 1]);
    let batch = numel(&out.shape[..r - 2]);
    let buffer = float_dtype!(args[0].dtype(), cx, |T| {
        let (x, y) = (cx.view::<T>(args[0])?, cx.view::<T>(args[1])?);
        T::into_buffer(matmul::matmul_t(x, a_t, y, b_t, batch, m, k, n))
    });
    HostTensor::new(out.shape.clone(), buffer.stored_as(out.dtype))
}

/// `Σ_ranks data` over the current run's processes
/// ([`crate::collective::current`]); `data` itself in a single process.
fn all_reduce_sum(mut data: Buffer, cx: &Cx) -> Result<Buffer, ExecError> {
    let c = crate::collective::current();
    if c.world() == 1 {
        return Ok(data);
    }
    let done = match &mut data {
        Buffer::F64(v) => c.all_reduce_sum_f64(v),
        Buffer::F32(v) => c.all_reduce_sum_f32(v),
        Buffer::Bf16(v) => c
            .all_reduce_sum_f32(v)
            .map(|()| coopc_ir::round_bf16_slice(v)),
        other => {
            return Err(ExecError::Unsupported {
                node: cx.node,
                op: cx.op,
                message: format!("cannot sum {} values over processes", other.dtype()),
            })
        }
    };
    done.map_err(|source| ExecError::Collective {
        node: cx.node,
        op: cx.op,
        source: Box::new(source),
    })?;
    Ok(data)
}

/// Computes the value of node `id` from its operand values (in slot order).
pub(crate) fn eval_node(
    graph: &Graph,
    id: NodeId,
    args: &[&HostTensor],
) -> Result<HostTensor, ExecError> {
    eval(graph, id, args)
}

fn eval(graph: &Graph, id: NodeId, args: &[&HostTensor]) -> Result<HostTensor, ExecError> {
    let node = graph.node(id);
    let cx = Cx {
        node: id.index(),
        op: node.op.name(),
    };
    let data: Buffer = match &node.op {
        Op::Input { .. } => return Err(missing_operand(graph, id)),
        Op::Reshape { .. } | Op::StopGradient | Op::Barrier { .. } => args[0].data.clone(),
        Op::AllReduceSum => all_reduce_sum(args[0].data.clone(), &cx)?,
        Op::Full { value, ty } => any_dtype!(ty.dtype, |T| {
            T::into_buffer(vec![T::from_f64_as(value.get()); ty.numel()])
        }),
        Op::Literal { values, ty } => any_dtype!(ty.dtype, |T| {
            T::into_buffer(values.iter().map(|v| T::from_f64_as(v.get())).collect())
        }),
        Op::Iota { axis, ty } => any_dtype!(ty.dtype, |T| {
            T::into_buffer(elementwise::iota::<T>(&ty.shape, *axis))
        }),
        Op::Unary(u) => float_dtype!(args[0].dtype(), cx, |T| {
            T::into_buffer(elementwise::unary(*u, cx.view::<T>(args[0])?))
        }),
        Op::Binary(b) => float_dtype!(args[0].dtype(), cx, |T| {
            let (x, y) = (cx.view::<T>(args[0])?, cx.view::<T>(args[1])?);
            T::into_buffer(elementwise::binary(*b, x, y))
        }),
        Op::Compare(c) => any_dtype!(args[0].dtype(), |T| {
            let (x, y) = (cx.view::<T>(args[0])?, cx.view::<T>(args[1])?);
            Buffer::Bool(elementwise::compare(*c, x, y))
        }),
        Op::Select => any_dtype!(args[1].dtype(), |T| {
            let cond = cx.view::<bool>(args[0])?;
            let (a, b) = (cx.view::<T>(args[1])?, cx.view::<T>(args[2])?);
            T::into_buffer(elementwise::select(cond, a, b))
        }),
        Op::Clamp { min, max } => float_dtype!(args[0].dtype(), cx, |T| {
            let (lo, hi) = (T::from_f64_as(min.get()), T::from_f64_as(max.get()));
            T::into_buffer(elementwise::clamp(cx.view::<T>(args[0])?, lo, hi))
        }),
        Op::Cast { to } => any_dtype!(args[0].dtype(), |S| {
            let x = cx.view::<S>(args[0])?;
            any_dtype!(*to, |D| D::into_buffer(elementwise::cast::<S, D>(x)))
        }),
        Op::Reduce { kind, axes, .. } => float_dtype!(args[0].dtype(), cx, |T| {
            let x = cx.view::<T>(args[0])?;
            T::into_buffer(reduce::reduce(*kind, x, &args[0].shape, axes))
        }),
        Op::MatMul => float_dtype!(args[0].dtype(), cx, |T| {
            let (a, b) = (args[0], args[1]);
            let r = a.rank();
            let (m, k, n) = (a.shape[r - 2], a.shape[r - 1], b.shape[r - 1]);
            let batch = numel(&a.shape[..r - 2]);
            let (x, y) = (cx.view::<T>(a)?, cx.view::<T>(b)?);
            T::into_buffer(matmul::matmul(x, y, batch, m, k, n))
        }),
        Op::Broadcast { shape } => any_dtype!(args[0].dtype(), |T| {
            let x = cx.view::<T>(args[0])?;
            T::into_buffer(movement::broadcast(x, &args[0].shape, shape))
        }),
        Op::Permute { perm } => any_dtype!(args[0].dtype(), |T| {
            let x = cx.view::<T>(args[0])?;
            T::into_buffer(movement::permute(x, &args[0].shape, perm))
        }),
        Op::Slice { start, end } => any_dtype!(args[0].dtype(), |T| {
            let x = cx.view::<T>(args[0])?;
            T::into_buffer(movement::slice(x, &args[0].shape, start, end))
        }),
        Op::Concat { axis } => any_dtype!(args[0].dtype(), |T| {
            let parts = args
                .iter()
                .map(|t| Ok((cx.view::<T>(t)?, &t.shape[..])))
                .collect::<Result<Vec<(&[T], &[usize])>, ExecError>>()?;
            T::into_buffer(movement::concat(&parts, *axis))
        }),
        Op::Pad { lo, hi, value } => any_dtype!(args[0].dtype(), |T| {
            let x = cx.view::<T>(args[0])?;
            let v = T::from_f64_as(value.get());
            T::into_buffer(movement::pad(x, &args[0].shape, lo, hi, v))
        }),
        Op::TakeAlongAxis { axis } => any_dtype!(args[0].dtype(), |T| {
            let (x, idx) = (args[0], args[1]);
            let out = index::take_along_axis(
                cx.view::<T>(x)?,
                &x.shape,
                cx.view::<i32>(idx)?,
                &idx.shape,
                *axis,
            );
            T::into_buffer(out.map_err(|e| cx.index(e))?)
        }),
        Op::ScatterAdd { axis } => float_dtype!(args[0].dtype(), cx, |T| {
            let (base, idx, upd) = (args[0], args[1], args[2]);
            let out = index::scatter_add(
                cx.view::<T>(base)?,
                &base.shape,
                cx.view::<i32>(idx)?,
                &idx.shape,
                cx.view::<T>(upd)?,
                *axis,
            );
            T::into_buffer(out.map_err(|e| cx.index(e))?)
        }),
        Op::UpdateSlice { axis } => any_dtype!(args[0].dtype(), |T| {
            let (base, upd) = (cx.view::<T>(args[0])?, cx.view::<T>(args[1])?);
            let index = cx.view::<i32>(args[2])?[0];
            T::into_buffer(movement::update_slice(
                base,
                &args[0].shape,
                upd,
                *axis,
                index,
            ))
        }),
        Op::Gather => any_dtype!(args[0].dtype(), |T| {
            let (table, ids) = (args[0], args[1]);
            let out = index::gather(cx.view::<T>(table)?, table.shape[0], cx.view::<i32>(ids)?);
            T::into_buffer(out.map_err(|e| cx.index(e))?)
        }),
        Op::ScatterAddRows { rows } => float_dtype!(args[1].dtype(), cx, |T| {
            let (ids, upd) = (args[0], args[1]);
            let row = numel(&upd.shape[ids.rank()..]);
            let out = index::scatter_add_rows(cx.view::<i32>(ids)?, cx.view::<T>(upd)?, *rows, row);
            T::into_buffer(out.map_err(|e| cx.index(e))?)
        }),
        Op::CausalAttention => float_dtype!(args[0].dtype(), cx, |T| {
            let dims = attention::Dims::of(&args[0].shape, &args[1].shape);
            let (q, k, v) = (
                cx.view::<T>(args[0])?,
                cx.view::<T>(args[1])?,
                cx.view::<T>(args[2])?,
            );
            T::into_buffer(attention::forward(&dims, q, k, v))
        }),
        Op::CachedAttention => float_dtype!(args[0].dtype(), cx, |T| {
            let (qs, ks) = (&args[0].shape, &args[1].shape);
            let [q, k, v] = [0, 1, 2].map(|i| cx.view::<T>(args[i]));
            let pos = cx.view::<i32>(args[3])?[0];
            let dims = [qs[1], ks[1], qs[3]];
            T::into_buffer(attention::cached(q?, k?, v?, dims, ks[2], pos))
        }),
        Op::CausalAttentionGrad { wrt } => float_dtype!(args[0].dtype(), cx, |T| {
            let dims = attention::Dims::of(&args[0].shape, &args[1].shape);
            let [q, k, v, o, d_o] = [0, 1, 2, 3, 4].map(|i| cx.view::<T>(args[i]));
            T::into_buffer(attention::grad(&dims, *wrt, [q?, k?, v?, o?, d_o?]))
        }),
        Op::LinearLogprob => float_dtype!(args[0].dtype(), cx, |T| {
            let (h, w, y) = (
                cx.view::<T>(args[0])?,
                cx.view::<T>(args[1])?,
                cx.view::<i32>(args[2])?,
            );
            let out = linear_logprob::forward(h, w, y, args[0].shape[1]);
            T::into_buffer(out.map_err(|e| cx.index(e))?)
        }),
        Op::LinearLogprobGrad { wrt } => float_dtype!(args[0].dtype(), cx, |T| {
            let [h, w, g] = [0, 1, 3].map(|i| cx.view::<T>(args[i]));
            let y = cx.view::<i32>(args[2])?;
            let out = linear_logprob::grad(*wrt, [h?, w?, g?], y, args[0].shape[1]);
            T::into_buffer(out.map_err(|e| cx.index(e))?)
        }),
        Op::LinearEntropy => float_dtype!(args[0].dtype(), cx, |T| {
            let (h, w) = (cx.view::<T>(args[0])?, cx.view::<T>(args[1])?);
            T::into_buffer(linear_logprob::entropy(h, w, args[0].shape[1]))
        }),
        Op::LinearEntropyGrad { wrt } => float_dtype!(args[0].dtype(), cx, |T| {
            let [h, w, g] = [0, 1, 2].map(|i| cx.view::<T>(args[i]));
            T::into_buffer(linear_logprob::entropy_grad(
                *wrt,
                [h?, w?, g?],
                args[0].shape[1],
            ))
        }),
        Op::RmsNorm { eps } => float_dtype!(args[0].dtype(), cx, |T| {
            let (x, w) = (cx.view::<T>(args[0])?, cx.view::<T>(args[1])?);
            T::into_buffer(rms_norm::forward(x, w, eps.get()))
        }),
        Op::RmsNormGrad { wrt, eps } => float_dtype!(args[0].dtype(), cx, |T| {
            let [x, w, dy] = [0, 1, 2].map(|i| cx.view::<T>(args[i]));
            T::into_buffer(rms_norm::grad(*wrt, x?, w?, dy?, eps.get()))
        }),
        Op::Rope { transpose } => float_dtype!(args[0].dtype(), cx, |T| {
            let [x, c, s] = [0, 1, 2].map(|i| cx.view::<T>(args[i]));
            let t = args[1].shape[0];
            T::into_buffer(rope::rope(x?, c?, s?, t, *transpose))
        }),
        Op::OptimStep { rule, out } => float_dtype!(args[0].dtype(), cx, |T| {
            let ops = args
                .iter()
                .map(|a| cx.view::<T>(a))
                .collect::<Result<Vec<_>, _>>()?;
            T::into_buffer(optim::step(*rule, *out, &ops))
        }),
        Op::TokenLoss { loss } | Op::TokenLossGrad { loss } => {
            float_dtype!(args[0].dtype(), cx, |T| {
                let ops = args
                    .iter()
                    .map(|a| cx.view::<T>(a))
                    .collect::<Result<Vec<_>, _>>()?;
                let (ops, gout) = ops.split_at(loss.arity());
                let cols = args[0].shape[1];
                T::into_buffer(match gout.first() {
                    Some(g) => losses::grad(*loss, ops, g[0], cols),
                    None => losses::loss(*loss, ops, cols),
                })
            })
        }
        Op::OneHot { depth, dtype } => float_dtype!(*dtype, cx, |T| {
            T::into_buffer(index::one_hot::<T>(cx.view::<i32>(args[0])?, *depth))
        }),
    };
    // A bf16 value is computed in f32 and rounded where it is stored.
    let data = data.stored_as(node.ty.dtype);
    debug_assert_eq!(data.len(), node.ty.numel(), "node %{} ({})", cx.node, cx.op);
    debug_assert_eq!(data.dtype(), node.ty.dtype, "node %{} ({})", cx.node, cx.op);
    Ok(HostTensor {
        shape: node.ty.shape.clone(),
        data,
    })
}

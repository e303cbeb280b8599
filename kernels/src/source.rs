//! Kernel source text without a device: each kernel of a fused schedule is
//! traced into a CubeCL kernel definition and compiled to CUDA C++ (the
//! text NVRTC receives) and to WGSL (what wgpu receives). Used by
//! `coopc compile --emit kernels` and by the snapshot tests.

use crate::attention::{
    attention_backward_kv, attention_backward_q, attention_forward, TILE_K, TILE_Q,
};
use crate::cached_attention::{cached_attention, CACHED_BLOCK, CACHED_CHUNK};
use crate::device::BLOCK;
use crate::elementwise::elementwise_program;
use crate::linear_logprob::{
    blocked_products, linear_entropy_fold, linear_entropy_scale, linear_logprob_coefficients,
    linear_logprob_fold, linear_logprob_forward, linear_logprob_forward_blocked,
    linear_logprob_merge, linear_logprob_scale, FOLD_BLOCK, LOGPROB_TILE,
};
use crate::matmul::{add_into, matmul_blocked, matmul_tiled, Product, TILE};
use crate::movement::{
    gather_rows, iota, one_hot, scatter_add_along, scatter_add_rows, strided_copy, take_along,
    write_slice, CopySpec,
};
use crate::optim::{adamw_step, momentum_step, sgd_step, StepKind, StepSpec};
use crate::program::{bf16_rounding, rounds_bf16_itself};
use crate::reduce::{reduce_program, reduce_program_rows, ReduceSpec};
use crate::rms_norm::{
    rms_norm_backward_w, rms_norm_backward_x, rms_norm_forward, rms_norm_inv_rms, NORM_BLOCK,
    NORM_COLS, NORM_LANES,
};
use crate::rope::rope;
use crate::sample::{sample_pick, sample_pick_ordered, sample_prepare, SAMPLE_BLOCK};
use crate::token_loss::{token_loss, token_loss_grad, LossSpec, LOSS_BLOCK};
use coopc_ir::kernel::{device_chunk, ElemProgram, FusedSchedule, Kernel, ReduceSplit};
use coopc_ir::{AttentionOperand, DType, Graph, LogprobOperand, NormOperand, Op};
use cubecl::prelude::*;
use cubecl::Compiler as _;
use std::collections::HashMap;

/// One kernel's source in both dialects.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSource {
    pub name: String,
    pub cuda: String,
    pub wgsl: String,
}

fn arrays(n: usize) -> SequenceCompilationArg<Array<f32>> {
    (0..n)
        .map(|_| ArrayCompilationArg { inplace: None })
        .collect()
}

fn array() -> ArrayCompilationArg {
    ArrayCompilationArg { inplace: None }
}

fn builder<R: Runtime>() -> KernelBuilder {
    let mut b = KernelBuilder::default();
    b.runtime_properties(R::target_properties());
    AddressType::U32.register(&mut b.scope);
    b
}

fn settings(name: &str, dim: CubeDim) -> KernelSettings {
    KernelSettings::default()
        .cube_dim(dim)
        .address_type(AddressType::U32)
        .kernel_name(name)
}

fn scalar(b: &mut KernelBuilder) -> NativeExpand<u32> {
    <u32 as LaunchArg>::expand(&(), b)
}

/// The options cubecl-cuda's runtime compiles a kernel with on an sm_90 GPU
/// (H100, H200) under CUDA ≥ 12.8, so that the emitted text is the text
/// NVRTC receives there: launch metadata passed by value as a
/// `__grid_constant__`, thread-block clusters, `elect.sync`, fast `tanh`,
/// 32-wide warps.
pub fn cuda_options() -> cubecl_cpp::shared::CompilationOptions {
    cubecl_cpp::shared::CompilationOptions {
        warp_size: 32,
        supports_features: cubecl_cpp::shared::CppSupportedFeatures {
            grid_constants: true,
            clusters: true,
            fast_math: true,
            fast_tanh: true,
            elect_sync: true,
        },
    }
}

/// The line that starts each kernel of a source holding several (each a
/// compilation unit of its own), followed by the kernel's name.
pub const PART_MARK: &str = "// coopc: kernel ";

/// A traced kernel: how to build its definition for a runtime.
#[derive(Clone, Debug)]
pub enum Traced {
    Elementwise(ElemProgram),
    Reduce {
        spec: ReduceSpec,
        n_pro: usize,
        n_epi: usize,
        n_out: usize,
        /// One cube per output element ([`reduce_program_rows`]).
        rows: bool,
    },
    /// The tiled matrix product, reading `a` and/or `b` transposed.
    Matmul {
        trans_a: bool,
        trans_b: bool,
        /// Which of coopc's product kernels (`matmul::Product::for_shape`).
        product: Product,
        /// Adds the product to the output instead of storing it.
        accumulate: bool,
    },
    Copy(CopySpec),
    TakeAlong,
    ScatterAddAlong,
    /// `update_slice`'s write of the update (into a copy of the base, or
    /// into a donated base).
    WriteSlice,
    /// The decode step's attention over its cache.
    CachedAttention,
    /// A policy loss (`grad`: its gradient with respect to the log-probs).
    TokenLoss {
        spec: LossSpec,
        grad: bool,
    },
    GatherRows,
    ScatterAddRows,
    OneHot,
    Iota,
    /// The hand-written RMSNorm kernels.
    RmsNorm(NormPart),
    /// The hand-written optimiser step of a rule, its gradient computed by
    /// a prologue of `n_grad` inputs.
    OptimStep {
        kind: StepKind,
        spec: StepSpec,
        n_grad: usize,
    },
    /// The token sampler's kernels (launched by `Device::sample_rows`, not
    /// by a program's schedule).
    Sample(SamplePart),
    /// The hand-written rotary embedding, or its transpose.
    Rope {
        transpose: bool,
    },
    /// The hand-written fused linear log-prob (forward).
    LinearLogprob,
    /// The register-blocked forward over one span of the vocabulary
    /// (partial log-sum-exps).
    LogprobForwardBlocked,
    /// The merge of the spans' partials into log-probs.
    LogprobMerge,
    /// The forward of a log-prob whose tokens are rows of h: the blocked
    /// forward and the merge.
    LinearLogprobSplit,
    /// The coefficients of one vocabulary chunk of its gradients.
    LogprobCoefficients,
    /// One vocabulary chunk of logits computed by CubeCL's matmul folded
    /// into each token's running log-sum-exp.
    LogprobFold,
    /// One chunk's coefficients from logits computed by CubeCL's matmul.
    LogprobScale,
    /// One vocabulary chunk of logits (the device's matmul's) folded into
    /// each token's running log-sum-exp and entropy.
    EntropyFold,
    /// One chunk's entropy-gradient coefficients from its logits.
    EntropyScale,
    /// The linear entropy's gradient: the forward's fold, the coefficients,
    /// and the products of `LogprobGradients` (the same fields).
    EntropyGradients {
        dh: Option<Product>,
        dh_chunks: bool,
        dw: Option<Product>,
        dw_rest: Option<Product>,
    },
    /// `out[off + i] += x[i]`: a product CubeCL's matmul computed into a
    /// temporary, accumulated.
    AddInto,
    /// Its gradients: the coefficient kernel, then the products for `dh`
    /// (`Some(kernel)`; storing for the first chunk, accumulating for the
    /// others when `dh_chunks > 1`) and `dW` (`Some(kernel)`; the last,
    /// shorter chunk's `dW` by `dw_rest` where that is another kernel).
    LogprobGradients {
        dh: Option<Product>,
        dh_chunks: bool,
        dw: Option<Product>,
        dw_rest: Option<Product>,
    },
    /// The hand-written causal attention: forward, backward `dq`, backward
    /// `dk, dv`.
    Attention(AttentionPart),
    /// An attention's gradients: the log-sum-exp pass, `dq` and, with
    /// `kv`, `dk, dv`.
    AttentionGrads {
        kv: bool,
    },
}

/// Which of the sampler's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplePart {
    /// The row check and argmax (`greedy`) or softmax.
    Prepare { greedy: bool },
    /// A top-p nucleus pick.
    Pick,
    /// A pick over the whole vocabulary in index order.
    PickOrdered,
}

impl SamplePart {
    pub const ALL: [SamplePart; 4] = [
        SamplePart::Prepare { greedy: true },
        SamplePart::Prepare { greedy: false },
        SamplePart::Pick,
        SamplePart::PickOrdered,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SamplePart::Prepare { greedy: true } => "sample_greedy",
            SamplePart::Prepare { greedy: false } => "sample_softmax",
            SamplePart::Pick => "sample_pick_top_p",
            SamplePart::PickOrdered => "sample_pick",
        }
    }
}

/// Which of the RMSNorm kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPart {
    Forward,
    BackwardX,
    /// Each row's `1 / rms`, launched before `BackwardW`.
    InvRms,
    BackwardW,
}

/// Which of the attention kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPart {
    Forward,
    /// The forward for the per-row log-sum-exp alone.
    LogSumExp,
    BackwardQ,
    BackwardKv,
}

impl Traced {
    fn define<R: Runtime>(&self, name: &str) -> KernelDefinition {
        let mut b = builder::<R>();
        let one_d = CubeDim::new_1d(BLOCK);
        match self {
            Traced::Elementwise(p) => {
                let i = <Sequence<Array<f32>> as LaunchArg>::expand(
                    &arrays(p.n_inputs as usize),
                    &mut b,
                );
                let o = <Sequence<Array<f32>> as LaunchArg>::expand_output(
                    &arrays(p.outputs.len()),
                    &mut b,
                );
                let n = scalar(&mut b);
                elementwise_program::expand(&mut b.scope, i, o, n, p.clone());
                b.build(settings(name, one_d))
            }
            Traced::Reduce {
                spec,
                n_pro,
                n_epi,
                n_out,
                rows,
            } => {
                let p = <Sequence<Array<f32>> as LaunchArg>::expand(&arrays(*n_pro), &mut b);
                let e = <Sequence<Array<f32>> as LaunchArg>::expand(&arrays(*n_epi), &mut b);
                let o = <Sequence<Array<f32>> as LaunchArg>::expand_output(&arrays(*n_out), &mut b);
                let n_o = scalar(&mut b);
                let n_r = scalar(&mut b);
                if *rows {
                    let block = BLOCK as usize;
                    reduce_program_rows::expand(
                        &mut b.scope,
                        p,
                        e,
                        o,
                        n_o,
                        n_r,
                        spec.clone(),
                        block,
                    );
                } else {
                    reduce_program::expand(&mut b.scope, p, e, o, n_o, n_r, spec.clone());
                }
                b.build(settings(name, one_d))
            }
            Traced::Matmul {
                trans_a,
                trans_b,
                product,
                accumulate,
            } => {
                let a = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let bb = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (m, k, n) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                let (ao, bo, oo) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                let (ta, tb) = (*trans_a, *trans_b);
                let sc = &mut b.scope;
                if *product != Product::Tiled {
                    let reg = product.reg();
                    matmul_blocked::expand(
                        sc,
                        a,
                        bb,
                        o,
                        m,
                        k,
                        n,
                        ao,
                        bo,
                        oo,
                        ta,
                        tb,
                        *accumulate,
                        reg,
                    );
                    b.build(settings(name, CubeDim::new_2d(16, 16)))
                } else {
                    matmul_tiled::expand(
                        sc,
                        a,
                        bb,
                        o,
                        m,
                        k,
                        n,
                        ao,
                        bo,
                        oo,
                        TILE,
                        ta,
                        tb,
                        *accumulate,
                    );
                    b.build(settings(name, CubeDim::new_2d(TILE as u32, TILE as u32)))
                }
            }
            Traced::Copy(spec) => {
                let s = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let d = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let n = scalar(&mut b);
                strided_copy::expand(&mut b.scope, s, d, n, spec.clone());
                b.build(settings(name, one_d))
            }
            Traced::OptimStep { kind, spec, n_grad } => {
                let gi = <Sequence<Array<f32>> as LaunchArg>::expand(&arrays(*n_grad), &mut b);
                let st: Vec<_> = (0..kind.state_arrays())
                    .map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b))
                    .collect();
                let o = <Sequence<Array<f32>> as LaunchArg>::expand_output(
                    &arrays(spec.n_outputs()),
                    &mut b,
                );
                let n = scalar(&mut b);
                let f = |b: &mut KernelBuilder| <f32 as LaunchArg>::expand(&(), b);
                let spec = spec.clone();
                let p = st[0].clone();
                match kind {
                    StepKind::Sgd => {
                        let lr = f(&mut b);
                        sgd_step::expand(&mut b.scope, gi, p, o, n, lr, spec);
                    }
                    StepKind::Momentum => {
                        let (lr, mu) = (f(&mut b), f(&mut b));
                        let buf = st[1].clone();
                        momentum_step::expand(&mut b.scope, gi, p, buf, o, n, lr, mu, spec);
                    }
                    StepKind::AdamW => {
                        let [lr, b1, b1c, b2, b2c, eps, decay] = [(); 7].map(|_| f(&mut b));
                        let (m, v, t) = (st[1].clone(), st[2].clone(), st[3].clone());
                        let sc = &mut b.scope;
                        adamw_step::expand(
                            sc, gi, p, m, v, t, o, n, lr, b1, b1c, b2, b2c, eps, decay, spec,
                        );
                    }
                }
                b.build(settings(name, one_d))
            }
            Traced::RmsNorm(part) => {
                let n_in = match part {
                    NormPart::Forward => 2,
                    NormPart::BackwardX | NormPart::BackwardW => 3,
                    NormPart::InvRms => 1,
                };
                let mut i = (0..n_in)
                    .map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b))
                    .collect::<Vec<_>>()
                    .into_iter();
                let mut next = || i.next().expect("operand");
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (rows, d) = (scalar(&mut b), scalar(&mut b));
                let dim = if *part == NormPart::BackwardW {
                    let sc = &mut b.scope;
                    let (x, dy, r) = (next(), next(), next());
                    rms_norm_backward_w::expand(sc, x, dy, r, o, rows, d, NORM_COLS, NORM_LANES);
                    CubeDim::new_2d(NORM_COLS as u32, NORM_LANES as u32)
                } else {
                    let eps = <f32 as LaunchArg>::expand(&(), &mut b);
                    let sc = &mut b.scope;
                    match part {
                        NormPart::Forward => {
                            let (x, w) = (next(), next());
                            rms_norm_forward::expand(sc, x, w, o, rows, d, eps, NORM_BLOCK)
                        }
                        NormPart::BackwardX => {
                            let (x, w, dy) = (next(), next(), next());
                            rms_norm_backward_x::expand(sc, x, w, dy, o, rows, d, eps, NORM_BLOCK)
                        }
                        _ => rms_norm_inv_rms::expand(sc, next(), o, rows, d, eps, NORM_BLOCK),
                    }
                    CubeDim::new_1d(NORM_BLOCK as u32)
                };
                b.build(settings(name, dim))
            }
            Traced::Sample(part) => {
                let n_in = match part {
                    SamplePart::Prepare { .. } => 1,
                    _ => 2,
                };
                let mut ins = (0..n_in)
                    .map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b))
                    .collect::<Vec<_>>()
                    .into_iter();
                let mut next = || ins.next().expect("operand");
                let blk = SAMPLE_BLOCK;
                match *part {
                    SamplePart::Prepare { greedy } => {
                        let logits = next();
                        let probs = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                        let tok = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                        let (rows, v) = (scalar(&mut b), scalar(&mut b));
                        let temp = <f32 as LaunchArg>::expand(&(), &mut b);
                        let sc = &mut b.scope;
                        sample_prepare::expand(sc, logits, probs, tok, rows, v, temp, greedy, blk);
                    }
                    SamplePart::Pick | SamplePart::PickOrdered => {
                        let (probs, draws) = (next(), next());
                        let tok = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                        let (rows, v) = (scalar(&mut b), scalar(&mut b));
                        if *part == SamplePart::Pick {
                            let top_p = <f32 as LaunchArg>::expand(&(), &mut b);
                            let sc = &mut b.scope;
                            sample_pick::expand(sc, probs, draws, tok, rows, v, top_p, blk);
                        } else {
                            let sc = &mut b.scope;
                            sample_pick_ordered::expand(sc, probs, draws, tok, rows, v, blk);
                        }
                    }
                }
                b.build(settings(name, CubeDim::new_1d(SAMPLE_BLOCK as u32)))
            }
            Traced::Rope { transpose } => {
                let x = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let c = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let s = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, t, hd) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                rope::expand(&mut b.scope, x, c, s, o, n, t, hd, *transpose);
                b.build(settings(name, one_d))
            }
            Traced::CachedAttention => {
                let [q, k, v, pos] =
                    [(); 4].map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let [rows, heads, kv, len, hd] = [(); 5].map(|_| scalar(&mut b));
                let scale = <f32 as LaunchArg>::expand(&(), &mut b);
                let sc = &mut b.scope;
                cached_attention::expand(
                    sc,
                    q,
                    k,
                    v,
                    pos,
                    o,
                    rows,
                    heads,
                    kv,
                    len,
                    hd,
                    scale,
                    CACHED_BLOCK,
                    CACHED_CHUNK,
                );
                b.build(settings(name, CubeDim::new_1d(CACHED_BLOCK as u32)))
            }
            Traced::TokenLoss { spec, grad } => {
                let [lp, mask, old, adv, refp] =
                    [(); 5].map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let gout = grad.then(|| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (rows, cols) = (scalar(&mut b), scalar(&mut b));
                let [lo, hi, beta, scale] =
                    [(); 4].map(|_| <f32 as LaunchArg>::expand(&(), &mut b));
                let (sc, spec) = (&mut b.scope, *spec);
                match gout {
                    Some(gout) => token_loss_grad::expand(
                        sc, lp, mask, old, adv, refp, gout, o, rows, cols, lo, hi, beta, scale,
                        spec, LOSS_BLOCK,
                    ),
                    None => token_loss::expand(
                        sc, lp, mask, old, adv, refp, o, rows, cols, lo, hi, beta, scale, spec,
                        LOSS_BLOCK,
                    ),
                }
                b.build(settings(name, CubeDim::new_1d(LOSS_BLOCK as u32)))
            }
            Traced::TakeAlong | Traced::GatherRows | Traced::WriteSlice => {
                let x = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let i = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, p, q) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                if matches!(self, Traced::WriteSlice) {
                    write_slice::expand(&mut b.scope, x, i, o, n, p, q);
                } else if matches!(self, Traced::TakeAlong) {
                    let r = scalar(&mut b);
                    take_along::expand(&mut b.scope, x, i, o, n, p, q, r);
                } else {
                    gather_rows::expand(&mut b.scope, x, i, o, n, p, q);
                }
                b.build(settings(name, one_d))
            }
            Traced::ScatterAddAlong => {
                let x = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let i = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let u = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, p, q, r) = (
                    scalar(&mut b),
                    scalar(&mut b),
                    scalar(&mut b),
                    scalar(&mut b),
                );
                scatter_add_along::expand(&mut b.scope, x, i, u, o, n, p, q, r);
                b.build(settings(name, one_d))
            }
            Traced::ScatterAddRows => {
                let i = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let u = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, p, q) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                scatter_add_rows::expand(&mut b.scope, i, u, o, n, p, q, BLOCK as usize);
                b.build(settings(name, one_d))
            }
            Traced::OneHot => {
                let i = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, d) = (scalar(&mut b), scalar(&mut b));
                one_hot::expand(&mut b.scope, i, o, n, d);
                b.build(settings(name, one_d))
            }
            Traced::LinearLogprob => {
                let h = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let w = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let y = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let lp = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let lse = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (t, d, v) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                let (so, si) = (scalar(&mut b), scalar(&mut b));
                linear_logprob_forward::expand(
                    &mut b.scope,
                    h,
                    w,
                    y,
                    lp,
                    lse,
                    t,
                    d,
                    v,
                    so,
                    si,
                    LOGPROB_TILE,
                );
                b.build(settings(
                    name,
                    CubeDim::new_2d(LOGPROB_TILE as u32, LOGPROB_TILE as u32),
                ))
            }
            Traced::LogprobCoefficients => {
                let mut ins = (0..5).map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let mut next = || ins.next().expect("operand");
                let (h, w, y, lse, g) = (next(), next(), next(), next(), next());
                let out = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (t, d, v) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                let (v0, vc) = (scalar(&mut b), scalar(&mut b));
                let sc = &mut b.scope;
                linear_logprob_coefficients::expand(sc, h, w, y, lse, g, out, t, d, v, v0, vc);
                b.build(settings(name, CubeDim::new_2d(16, 16)))
            }
            Traced::LogprobForwardBlocked => {
                let mut ins = (0..3).map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let mut next = || ins.next().expect("operand");
                let (h, w, y) = (next(), next(), next());
                let mut outs =
                    (0..3).map(|_| <Array<f32> as LaunchArg>::expand_output(&array(), &mut b));
                let mut out = || outs.next().expect("output");
                let (pm, ps, tl) = (out(), out(), out());
                let (t, d, v) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                let span = scalar(&mut b);
                let sc = &mut b.scope;
                linear_logprob_forward_blocked::expand(sc, h, w, y, pm, ps, tl, t, d, v, span);
                b.build(settings(name, CubeDim::new_2d(16, 16)))
            }
            Traced::LogprobMerge => {
                let mut ins = (0..4).map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let mut next = || ins.next().expect("operand");
                let (y, pm, ps, tl) = (next(), next(), next(), next());
                let lp = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let lse = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (t, v, k) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                linear_logprob_merge::expand(&mut b.scope, y, pm, ps, tl, lp, lse, t, v, k);
                b.build(settings(name, CubeDim::new_1d(256)))
            }
            Traced::LogprobFold => {
                let y_in = |b: &mut KernelBuilder| <Array<f32> as LaunchArg>::expand(&array(), b);
                let (z, y) = (y_in(&mut b), y_in(&mut b));
                let mut outs =
                    (0..3).map(|_| <Array<f32> as LaunchArg>::expand_output(&array(), &mut b));
                let mut out = || outs.next().expect("output");
                let (pm, ps, tl) = (out(), out(), out());
                let (t, v) = (scalar(&mut b), scalar(&mut b));
                let (v0, vc) = (scalar(&mut b), scalar(&mut b));
                let sc = &mut b.scope;
                linear_logprob_fold::expand(sc, z, y, pm, ps, tl, t, v, v0, vc, FOLD_BLOCK);
                b.build(settings(name, CubeDim::new_1d(FOLD_BLOCK as u32)))
            }
            Traced::LogprobScale => {
                let c = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let mut ins = (0..3).map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let mut next = || ins.next().expect("operand");
                let (y, lse, g) = (next(), next(), next());
                let (t, v) = (scalar(&mut b), scalar(&mut b));
                let (v0, vc) = (scalar(&mut b), scalar(&mut b));
                linear_logprob_scale::expand(&mut b.scope, c, y, lse, g, t, v, v0, vc);
                b.build(settings(name, CubeDim::new_1d(256)))
            }
            Traced::EntropyFold => {
                let z = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let mut outs =
                    (0..5).map(|_| <Array<f32> as LaunchArg>::expand_output(&array(), &mut b));
                let mut out = || outs.next().expect("output");
                let (rm, rs, ru, lse, e) = (out(), out(), out(), out(), out());
                let (t, v0, vc) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                let sc = &mut b.scope;
                linear_entropy_fold::expand(sc, z, rm, rs, ru, lse, e, t, v0, vc, FOLD_BLOCK);
                b.build(settings(name, CubeDim::new_1d(FOLD_BLOCK as u32)))
            }
            Traced::EntropyScale => {
                let c = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let mut ins = (0..3).map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b));
                let mut next = || ins.next().expect("operand");
                let (lse, e, g) = (next(), next(), next());
                let (t, vc) = (scalar(&mut b), scalar(&mut b));
                linear_entropy_scale::expand(&mut b.scope, c, lse, e, g, t, vc);
                b.build(settings(name, CubeDim::new_1d(256)))
            }
            Traced::AddInto => {
                let out = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let x = <Array<f32> as LaunchArg>::expand(&array(), &mut b);
                let (off, len) = (scalar(&mut b), scalar(&mut b));
                add_into::expand(&mut b.scope, out, x, off, len);
                b.build(settings(name, CubeDim::new_1d(256)))
            }
            Traced::LinearLogprobSplit
            | Traced::LogprobGradients { .. }
            | Traced::EntropyGradients { .. }
            | Traced::AttentionGrads { .. } => {
                unreachable!("defined by its parts")
            }
            Traced::Attention(part) => {
                let n_in = match part {
                    AttentionPart::Forward | AttentionPart::LogSumExp => 3,
                    AttentionPart::BackwardQ => 6,
                    AttentionPart::BackwardKv => 6,
                };
                let mut ins: Vec<_> = (0..n_in)
                    .map(|_| <Array<f32> as LaunchArg>::expand(&array(), &mut b))
                    .collect();
                let o1 = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let o2 = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, t, hd, h, kv) = (
                    scalar(&mut b),
                    scalar(&mut b),
                    scalar(&mut b),
                    scalar(&mut b),
                    scalar(&mut b),
                );
                let scale = <f32 as LaunchArg>::expand(&(), &mut b);
                let mut next = || ins.remove(0);
                match part {
                    AttentionPart::Forward | AttentionPart::LogSumExp => {
                        let (q, k, v) = (next(), next(), next());
                        let sc = &mut b.scope;
                        let out = *part == AttentionPart::Forward;
                        attention_forward::expand(sc, q, k, v, o1, o2, n, t, hd, h, kv, scale, out);
                    }
                    AttentionPart::BackwardQ => {
                        let (q, k, v, o, d_o, lse) =
                            (next(), next(), next(), next(), next(), next());
                        let sc = &mut b.scope;
                        attention_backward_q::expand(
                            sc, q, k, v, o, d_o, lse, o1, o2, n, t, hd, h, kv, scale,
                        );
                    }
                    AttentionPart::BackwardKv => {
                        let (q, k, v, d_o, lse, delta) =
                            (next(), next(), next(), next(), next(), next());
                        let sc = &mut b.scope;
                        attention_backward_kv::expand(
                            sc, q, k, v, d_o, lse, delta, o1, o2, n, t, hd, h, kv, scale,
                        );
                    }
                }
                b.build(settings(
                    name,
                    CubeDim::new_2d(TILE_K as u32, TILE_Q as u32),
                ))
            }
            Traced::Iota => {
                let o = <Array<f32> as LaunchArg>::expand_output(&array(), &mut b);
                let (n, e, i) = (scalar(&mut b), scalar(&mut b), scalar(&mut b));
                iota::expand(&mut b.scope, o, n, e, i);
                b.build(settings(name, one_d))
            }
        }
    }

    /// CUDA C++ and WGSL of this kernel under `name`.
    pub fn source(&self, name: &str) -> Result<KernelSource, String> {
        let parts = self.parts();
        if parts.is_empty() {
            return self.single_source(name);
        }
        let mut all = KernelSource {
            name: name.to_string(),
            cuda: String::new(),
            wgsl: String::new(),
        };
        for (suffix, part) in parts {
            let part_name = format!("{name}{suffix}");
            let src = part.single_source(&part_name)?;
            for (to, from) in [(&mut all.cuda, src.cuda), (&mut all.wgsl, src.wgsl)] {
                if !to.is_empty() {
                    to.push('\n');
                }
                // Each part is compiled on its own at launch.
                to.push_str(&format!("{PART_MARK}{part_name}\n"));
                to.push_str(&from);
            }
        }
        Ok(all)
    }

    /// The kernels, in launch order, of a traced kernel that launches
    /// several (with a suffix for each name); empty for a single kernel.
    fn parts(&self) -> Vec<(&'static str, Traced)> {
        match self {
            Traced::RmsNorm(NormPart::BackwardW) => vec![
                ("_inv_rms", Traced::RmsNorm(NormPart::InvRms)),
                ("", self.clone()),
            ],
            Traced::AttentionGrads { kv } => {
                let mut parts = vec![
                    ("_lse", Traced::Attention(AttentionPart::LogSumExp)),
                    ("_dq", Traced::Attention(AttentionPart::BackwardQ)),
                ];
                if *kv {
                    parts.push(("_dkv", Traced::Attention(AttentionPart::BackwardKv)));
                }
                parts
            }
            // With CubeCL's matmul (the default), its products (generated at
            // launch, not written here), `_fold` and `_merge`; with
            // coopc's, the fused `""` and `_merge`.
            Traced::LinearLogprobSplit => vec![
                ("_fold", Traced::LogprobFold),
                ("", Traced::LogprobForwardBlocked),
                ("_merge", Traced::LogprobMerge),
            ],
            Traced::LogprobGradients {
                dh,
                dh_chunks,
                dw,
                dw_rest,
            } => {
                // The forward runs first, for the log-sum-exp. With CubeCL's
                // matmul, its products, `_scale` for the coefficients and
                // `_dh_add_into` for dh's later chunks; with coopc's,
                // `_coefficients` and its own products.
                let mut parts = vec![
                    ("_forward_fold", Traced::LogprobFold),
                    ("_forward", Traced::LogprobForwardBlocked),
                    ("_merge", Traced::LogprobMerge),
                    ("_scale", Traced::LogprobScale),
                    ("_coefficients", Traced::LogprobCoefficients),
                ];
                parts.extend(gradient_products(*dh, *dh_chunks, *dw, *dw_rest));
                parts
            }
            // The logits' products are the device's matmul's (CubeCL's,
            // generated at launch, or coopc's); the rest as for the log-prob.
            Traced::EntropyGradients {
                dh,
                dh_chunks,
                dw,
                dw_rest,
            } => {
                let mut parts = vec![
                    ("_forward_fold", Traced::EntropyFold),
                    ("_scale", Traced::EntropyScale),
                ];
                parts.extend(gradient_products(*dh, *dh_chunks, *dw, *dw_rest));
                parts
            }
            _ => Vec::new(),
        }
    }

    fn single_source(&self, name: &str) -> Result<KernelSource, String> {
        let addr = AddressType::U32.unsigned_type();
        let def = self.define::<cubecl::cuda::CudaRuntime>(name);
        let mut cuda = cubecl::cuda::CudaCompiler::default();
        let opts = cuda_options();
        let cuda = cuda
            .compile(def, &opts, ExecutionMode::Checked, addr)
            .map_err(|e| format!("CUDA compile of {name}: {e:?}"))?
            .to_string();
        let def = self.define::<cubecl::wgpu::WgpuRuntime>(name);
        let mut wgsl = cubecl::wgpu::WgslCompiler::default();
        let opts = cubecl::WgpuCompilationOptions::default();
        let wgsl = wgsl
            .compile(def, &opts, ExecutionMode::Checked, addr)
            .map_err(|e| format!("WGSL compile of {name}: {e:?}"))?
            .to_string();
        Ok(KernelSource {
            name: name.to_string(),
            cuda,
            wgsl,
        })
    }
}

/// The products of a linear log-prob's or entropy's gradients from one
/// chunk's coefficients (see `Traced::LogprobGradients`).
fn gradient_products(
    dh: Option<Product>,
    dh_chunks: bool,
    dw: Option<Product>,
    dw_rest: Option<Product>,
) -> Vec<(&'static str, Traced)> {
    let product = |trans_a, product, accumulate| Traced::Matmul {
        trans_a,
        trans_b: false,
        product,
        accumulate,
    };
    let mut parts = Vec::new();
    if let Some(kernel) = dh {
        if dh_chunks {
            parts.push(("_dh_add_into", Traced::AddInto));
        }
        parts.push(("_dh", product(false, kernel, false)));
        if dh_chunks {
            parts.push(("_dh_add", product(false, kernel, true)));
        }
    }
    if let Some(kernel) = dw {
        parts.push(("_dw", product(true, kernel, false)));
    }
    if let Some(kernel) = dw_rest {
        parts.push(("_dw_last", product(true, kernel, false)));
    }
    parts
}

/// The traced form of one kernel of `g`'s fused schedule, or `None` for a
/// kernel that needs no code (inputs, constants uploaded as data,
/// relabelings that share their operand's buffer).
pub fn trace(g: &Graph, k: &Kernel) -> Option<(String, Traced)> {
    Some(match k {
        Kernel::Elementwise { program, .. } => {
            ("elementwise".into(), Traced::Elementwise(program.clone()))
        }
        Kernel::Reduce {
            kind,
            layout,
            split,
            prologue,
            prologue_inputs,
            epilogue,
            epilogue_inputs,
            outputs,
        } => (
            format!(
                "reduce_{}{}",
                kind.name(),
                if *split == ReduceSplit::CubePerOutput {
                    "_rows"
                } else {
                    ""
                }
            ),
            Traced::Reduce {
                spec: ReduceSpec {
                    kind: *kind,
                    layout: layout.clone(),
                    prologue: prologue.clone(),
                    epilogue: epilogue.clone(),
                },
                n_pro: prologue_inputs.len(),
                n_epi: epilogue_inputs.len() - 1,
                n_out: outputs.len(),
                rows: *split == ReduceSplit::CubePerOutput,
            },
        ),
        Kernel::MatMul {
            id,
            trans_a,
            trans_b,
            ..
        } => {
            let s = &g.ty(*id).shape;
            let product = Product::for_shape(s[s.len() - 2], s[s.len() - 1]);
            (
                format!(
                    "{}{}",
                    product.name(),
                    match (trans_a, trans_b) {
                        (false, false) => "",
                        (true, false) => "_ta",
                        (false, true) => "_tb",
                        (true, true) => "_ta_tb",
                    }
                ),
                Traced::Matmul {
                    trans_a: *trans_a,
                    trans_b: *trans_b,
                    product,
                    accumulate: false,
                },
            )
        }
        Kernel::LinearLogprob {
            seq_out, seq_in, ..
        } => (
            "linear_logprob".into(),
            if seq_out == seq_in {
                Traced::LinearLogprobSplit
            } else {
                Traced::LinearLogprob
            },
        ),
        Kernel::Attention { .. } => (
            "attention".into(),
            Traced::Attention(AttentionPart::Forward),
        ),
        // The log-sum-exp pass, dq (with the rows' delta) and, for dk or dv,
        // the key-side kernel.
        Kernel::AttentionGrads { grads, .. } => {
            let kv = grads.iter().any(|(w, _)| *w != AttentionOperand::Q);
            let name = if kv {
                "attention_backward_kv"
            } else {
                "attention_backward_q"
            };
            (name.into(), Traced::AttentionGrads { kv })
        }
        Kernel::LogprobGrads {
            inputs,
            grads,
            chunk,
        } => {
            let (n, d) = (g.ty(inputs[0]).shape[0], g.ty(inputs[0]).shape[1]);
            let vocab = g.ty(inputs[1]).shape[0];
            let chunk = *chunk;
            let (dh, dw, dw_rest) = blocked_products(n, d, vocab, chunk);
            let asked = |o| grads.iter().any(|&(wrt, _)| wrt == o);
            let (h, w) = (asked(LogprobOperand::Hidden), asked(LogprobOperand::Weight));
            let name = match (h, w) {
                (true, true) => "linear_logprob_backward_hw",
                (true, false) => "linear_logprob_backward_h",
                _ => "linear_logprob_backward_w",
            };
            (
                name.into(),
                Traced::LogprobGradients {
                    dh: h.then_some(dh),
                    dh_chunks: vocab > chunk,
                    dw: w.then_some(dw),
                    dw_rest: dw_rest.filter(|_| w),
                },
            )
        }
        Kernel::OptimStep {
            rule,
            prologue_inputs,
            ..
        } => (
            format!("{}_step", rule.name()),
            Traced::OptimStep {
                kind: StepKind::of(*rule),
                spec: StepSpec::of(k)?,
                n_grad: prologue_inputs.len(),
            },
        ),
        Kernel::Node(id) => {
            match g.op(*id) {
                // A concat is one strided copy per operand; the first stands for all.
                op @ (Op::Permute { .. }
                | Op::Slice { .. }
                | Op::Pad { .. }
                | Op::Concat { .. }) => {
                    let spec = CopySpec::for_node(g, *id)?.swap_remove(0);
                    (op.name().to_string(), Traced::Copy(spec))
                }
                Op::TakeAlongAxis { .. } => ("take_along_axis".into(), Traced::TakeAlong),
                Op::ScatterAdd { .. } => ("scatter_add".into(), Traced::ScatterAddAlong),
                Op::Gather => ("gather".into(), Traced::GatherRows),
                Op::UpdateSlice { .. } => ("update_slice".into(), Traced::WriteSlice),
                Op::CachedAttention => ("cached_attention".into(), Traced::CachedAttention),
                op @ (Op::TokenLoss { loss } | Op::TokenLossGrad { loss }) => {
                    let grad = matches!(op, Op::TokenLossGrad { .. });
                    let spec = LossSpec::of(*loss);
                    (op.name().to_string(), Traced::TokenLoss { spec, grad })
                }
                Op::ScatterAddRows { .. } => ("scatter_add_rows".into(), Traced::ScatterAddRows),
                Op::LinearEntropy => ("linear_entropy".into(), Traced::EntropyFold),
                Op::LinearEntropyGrad { wrt } => {
                    let ins = g.inputs(*id);
                    let (n, d) = (g.ty(ins[0]).shape[0], g.ty(ins[0]).shape[1]);
                    let vocab = g.ty(ins[1]).shape[0];
                    let chunk = device_chunk(n, vocab).clamp(1, vocab.max(1));
                    let (dh, dw, dw_rest) = blocked_products(n, d, vocab, chunk);
                    let h = *wrt == LogprobOperand::Hidden;
                    (
                        format!("linear_entropy_backward_{}", wrt.name()),
                        Traced::EntropyGradients {
                            dh: h.then_some(dh),
                            dh_chunks: vocab > chunk,
                            dw: (!h).then_some(dw),
                            dw_rest: dw_rest.filter(|_| !h),
                        },
                    )
                }
                Op::OneHot { .. } => ("one_hot".into(), Traced::OneHot),
                Op::Iota { .. } => ("iota".into(), Traced::Iota),
                Op::RmsNorm { .. } => ("rms_norm".into(), Traced::RmsNorm(NormPart::Forward)),
                Op::RmsNormGrad { wrt, .. } => match wrt {
                    NormOperand::Input => (
                        "rms_norm_backward_x".into(),
                        Traced::RmsNorm(NormPart::BackwardX),
                    ),
                    NormOperand::Weight => (
                        "rms_norm_backward_w".into(),
                        Traced::RmsNorm(NormPart::BackwardW),
                    ),
                },
                Op::Rope { transpose } => (
                    if *transpose { "rope_transpose" } else { "rope" }.into(),
                    Traced::Rope {
                        transpose: *transpose,
                    },
                ),
                // It also runs the forward kernel for the log-sum-exp (and
                // the dq kernel for dk, dv's row sums), listed where the
                // schedule's attention forward is.
                _ => return None,
            }
        }
    })
}

/// Every distinct kernel of a fused schedule, numbered in launch order
/// (`k003_elementwise`, …), with the schedule positions that use it.
pub fn schedule_sources(
    g: &Graph,
    fused: &FusedSchedule,
) -> Result<Vec<(KernelSource, Vec<usize>)>, String> {
    // bf16 values live in f32 buffers, rounded by the fused programs and,
    // after any other kernel with a bf16 result, by one more program
    // (`Device::launch`).
    let fused = fused.rounding_bf16(g);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(KernelSource, Vec<usize>)> = Vec::new();
    for (pos, k) in fused.kernels.iter().enumerate() {
        let rounding = (!rounds_bf16_itself(g, k)
            && k.writes().iter().any(|&id| g.ty(id).dtype == DType::Bf16))
        .then(|| {
            (
                "elementwise".to_string(),
                Traced::Elementwise(bf16_rounding()),
            )
        });
        for (family, traced) in trace(g, k).into_iter().chain(rounding) {
            let key = format!("{family}:{traced:?}");
            if let Some(&i) = seen.get(&key) {
                out[i].1.push(pos);
                continue;
            }
            let name = format!("k{:03}_{family}", out.len());
            seen.insert(key, out.len());
            out.push((traced.source(&name)?, vec![pos]));
        }
    }
    Ok(out)
}

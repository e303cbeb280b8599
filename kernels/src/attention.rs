//! Causal softmax attention as hand-written kernels that never store the
//! `[T, T]` probabilities: forward `o = softmax(q kᵀ · scale + causal) v`
//! with its per-row log-sum-exp, and the backward pass, which recomputes
//! the probabilities from that log-sum-exp (the flash-attention recurrence,
//! without its tiling). Grouped-query attention: query head `h` of `H`
//! reads key/value head `h / (H / H_kv)`.
//!
//! Layouts (row-major): `q, o, do, dq` are `[B, H, T, hd]`; `k, v, dk, dv`
//! are `[B, H_kv, T, hd]`; `lse` and `delta` are `[B, H, T]`. Every cube
//! has `block` units and `hd ≤ block`.
//!
//! - forward: one cube per query row; pass 1 folds an online (max, Σexp)
//!   per unit over the keys `j ≤ i` and merges them in shared memory; pass
//!   2 scores the keys chunk by chunk into shared memory and each unit
//!   accumulates one output column. Scores are computed twice.
//! - backward `dq` (also writes `delta_i = do_i · o_i`): one cube per query
//!   row, `ds_ij = p_ij (do_i · v_j − delta_i)` chunk by chunk, `dq_i =
//!   scale Σ_j ds_ij k_j`.
//! - backward `dk, dv`: one cube per key row, over the queries `i ≥ j` of
//!   every query head of its group: `dv_j = Σ_i p_ij do_i`, `dk_j = scale
//!   Σ_i ds_ij q_i`.
//!
//! Written for correctness first: dot products are serial per unit and
//! nothing is staged in tiles; memory is O(B·H·T) beyond the operands.
//! The device executor runs the IR's `causal_attention` op (and a matched
//! attention subgraph whose scores have no other reader) with the forward
//! kernel (`Kernel::Attention`), and each `causal_attention_grad` op with
//! the forward (for the log-sum-exp) and the backward kernels.

use crate::device::{arg, cubes, Device, DeviceError};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The log-sum-exp over a cube of each unit's online `(max m, Σ exp(x −
/// m))` pair: the pairs are merged pairwise in `maxes`/`sums` (shared,
/// one slot per unit); every unit gets the result.
#[cube]
pub(crate) fn cube_log_sum_exp(
    m: f32,
    s: f32,
    maxes: &mut SharedMemory<f32>,
    sums: &mut SharedMemory<f32>,
    tid: usize,
) -> f32 {
    maxes[tid] = m;
    sums[tid] = s;
    sync_cube();
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0usize {
        if tid < stride {
            let (m1, m2) = (maxes[tid], maxes[tid + stride]);
            let mn = max(m1, m2);
            sums[tid] = sums[tid] * (m1 - mn).exp() + sums[tid + stride] * (m2 - mn).exp();
            maxes[tid] = mn;
        }
        sync_cube();
        stride /= 2usize;
    }
    maxes[0usize] + sums[0usize].ln()
}

/// Units per cube; the head dimension must not exceed it.
pub const ATTENTION_BLOCK: usize = 128;

// The fusion pass only puts attention in graphs with head dims it takes.
const _: () = assert!(coopc_compiler::fusion::MAX_ATTENTION_HEAD_DIM <= ATTENTION_BLOCK);

/// The key/value row of query row `c` (`c` over `[B, H, T]`): its first
/// element, `((b · H_kv + h / group) · T) · hd`.
#[cube]
fn kv_base(c: usize, t: usize, hd: usize, heads: usize, kv_heads: usize) -> usize {
    let bh = c / t;
    let kv_row = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
    kv_row * t * hd
}

/// `a[a0..a0+n] · b[b0..b0+n]`, serially.
#[cube]
fn dot(a: &Array<f32>, a0: usize, b: &Array<f32>, b0: usize, n: usize, zero: f32) -> f32 {
    let mut z = zero;
    let mut d = n * 0usize;
    while d < n {
        z += a[a0 + d] * b[b0 + d];
        d += 1usize;
    }
    z
}

/// Launch with one cube per query row (`n_rows = B·H·T` cubes).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    o: &mut Array<f32>,
    lse: &mut Array<f32>,
    n_rows: u32,
    t: u32,
    hd: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    #[comptime] block: usize,
) {
    let c = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if c >= n_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let (t, hd) = (t as usize, hd as usize);
    let i = c % t;
    let kv0 = kv_base(c, t, hd, n_heads as usize, n_kv_heads as usize);
    let q0 = c * hd;
    let mut maxes = SharedMemory::<f32>::new(block);
    let mut sums = SharedMemory::<f32>::new(block);
    let mut p = SharedMemory::<f32>::new(block);
    // Run-time constants (WGSL has no literal for −∞; mutable variables
    // must start from run-time values).
    let zero = q[q0] * f32::new(0.0);
    let mut m = zero - f32::new(3.0e38);
    let mut s = zero;
    let mut j = tid;
    while j <= i {
        let z = dot(q, q0, k, kv0 + j * hd, hd, zero) * scale;
        let mn = max(m, z);
        s = s * (m - mn).exp() + (z - mn).exp();
        m = mn;
        j += block;
    }
    let l = cube_log_sum_exp(m, s, &mut maxes, &mut sums, tid);
    let mut acc = zero;
    let mut j0 = tid * 0usize;
    while j0 <= i {
        let jj = j0 + tid;
        let mut e = zero;
        if jj <= i {
            e = (dot(q, q0, k, kv0 + jj * hd, hd, zero) * scale - l).exp();
        }
        p[tid] = e;
        sync_cube();
        if tid < hd {
            let mut cc = tid * 0usize;
            while cc < block && j0 + cc <= i {
                acc += p[cc] * v[kv0 + (j0 + cc) * hd + tid];
                cc += 1usize;
            }
        }
        sync_cube();
        j0 += block;
    }
    if tid < hd {
        o[q0 + tid] = acc;
    }
    if tid == 0 {
        lse[c] = l;
    }
}

/// `dq` and `delta = rowsum(do ∘ o)`; one cube per query row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_q(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    o: &Array<f32>,
    d_o: &Array<f32>,
    lse: &Array<f32>,
    dq: &mut Array<f32>,
    delta: &mut Array<f32>,
    n_rows: u32,
    t: u32,
    hd: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    #[comptime] block: usize,
) {
    let c = CUBE_POS;
    if c >= n_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let (t, hd) = (t as usize, hd as usize);
    let i = c % t;
    let kv0 = kv_base(c, t, hd, n_heads as usize, n_kv_heads as usize);
    let q0 = c * hd;
    let zero = q[q0] * f32::new(0.0);
    let dd = dot(d_o, q0, o, q0, hd, zero);
    let l = lse[c];
    let mut ds = SharedMemory::<f32>::new(block);
    let mut acc = zero;
    let mut j0 = tid * 0usize;
    while j0 <= i {
        let j = j0 + tid;
        let mut x = zero;
        if j <= i {
            let pr = (dot(q, q0, k, kv0 + j * hd, hd, zero) * scale - l).exp();
            x = pr * (dot(d_o, q0, v, kv0 + j * hd, hd, zero) - dd);
        }
        ds[tid] = x;
        sync_cube();
        if tid < hd {
            let mut cc = tid * 0usize;
            while cc < block && j0 + cc <= i {
                acc += ds[cc] * k[kv0 + (j0 + cc) * hd + tid];
                cc += 1usize;
            }
        }
        sync_cube();
        j0 += block;
    }
    if tid < hd {
        dq[q0 + tid] = acc * scale;
    }
    if tid == 0 {
        delta[c] = dd;
    }
}

/// `dk`, `dv`; one cube per key/value row (`B·H_kv·T` cubes), after
/// [`attention_backward_q`] wrote `delta`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_kv(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    d_o: &Array<f32>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    dk: &mut Array<f32>,
    dv: &mut Array<f32>,
    n_kv_rows: u32,
    t: u32,
    hd: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    #[comptime] block: usize,
) {
    let c = CUBE_POS;
    if c >= n_kv_rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let (t, hd) = (t as usize, hd as usize);
    let (heads, kv_heads) = (n_heads as usize, n_kv_heads as usize);
    let group = heads / kv_heads;
    let j = c % t;
    let bkv = c / t;
    let k0 = c * hd;
    let zero = k[k0] * f32::new(0.0);
    let mut pp = SharedMemory::<f32>::new(block);
    let mut ds = SharedMemory::<f32>::new(block);
    let mut acc_k = zero;
    let mut acc_v = zero;
    let mut g = tid * 0usize;
    while g < group {
        // Query head of this kv head's group, in the same batch row.
        let bh = (bkv / kv_heads) * heads + (bkv % kv_heads) * group + g;
        let qrow = bh * t;
        let mut i0 = j;
        while i0 < t {
            let i = i0 + tid;
            let mut a = zero;
            let mut x = zero;
            if i < t {
                let base = (qrow + i) * hd;
                a = (dot(q, base, k, k0, hd, zero) * scale - lse[qrow + i]).exp();
                x = a * (dot(d_o, base, v, k0, hd, zero) - delta[qrow + i]);
            }
            pp[tid] = a;
            ds[tid] = x;
            sync_cube();
            if tid < hd {
                let mut cc = tid * 0usize;
                while cc < block && i0 + cc < t {
                    let at = (qrow + i0 + cc) * hd + tid;
                    acc_v += pp[cc] * d_o[at];
                    acc_k += ds[cc] * q[at];
                    cc += 1usize;
                }
            }
            sync_cube();
            i0 += block;
        }
        g += 1usize;
    }
    if tid < hd {
        dk[k0 + tid] = acc_k * scale;
        dv[k0 + tid] = acc_v;
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn q_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }

    fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }

    fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn check(&self, what: &str, lens: &[(&str, usize, usize)]) -> Result<(), DeviceError> {
        let s = self;
        let bad_shape = s.batch * s.heads * s.kv_heads * s.seq * s.head_dim == 0
            || !s.heads.is_multiple_of(s.kv_heads)
            || s.head_dim > ATTENTION_BLOCK;
        if bad_shape {
            return Err(DeviceError::Device(format!(
                "{what}: unsupported shape {s:?} (non-empty, heads a multiple of kv_heads, head_dim ≤ {ATTENTION_BLOCK})"
            )));
        }
        for (name, got, want) in lens {
            if got != want {
                return Err(DeviceError::Device(format!(
                    "{what}: `{name}` has {got} elements, {s:?} needs {want}"
                )));
            }
        }
        Ok(())
    }
}

impl AttentionShape {
    /// The shape of an attention of `q [B, H, T, hd]` over key/value heads
    /// `kv_heads`.
    pub fn of(q: &[usize], kv_heads: usize) -> AttentionShape {
        AttentionShape {
            batch: q[0],
            heads: q[1],
            kv_heads,
            seq: q[2],
            head_dim: q[3],
        }
    }
}

impl<R: Runtime> Device<R> {
    /// Launches [`attention_forward`] on device buffers: `(o, lse)`.
    pub(crate) fn launch_attention(
        &self,
        [q, k, v]: [&Handle; 3],
        s: AttentionShape,
    ) -> Result<(Handle, Handle), DeviceError> {
        s.check("attention", &[])?;
        let (ql, kl, rows) = (s.q_len(), s.kv_len(), s.rows());
        let (o, lse) = (self.output(ql), self.output(rows));
        attention_forward::launch::<R>(
            self.client(),
            cubes(rows),
            CubeDim::new_1d(ATTENTION_BLOCK as u32),
            arg(q, ql),
            arg(k, kl),
            arg(v, kl),
            arg(&o, ql),
            arg(&lse, rows),
            rows as u32,
            s.seq as u32,
            s.head_dim as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.scale(),
            ATTENTION_BLOCK,
        );
        Ok((o, lse))
    }

    /// Launches [`attention_backward_q`] then, when `kv`, also
    /// [`attention_backward_kv`]: `(dq, Some((dk, dv)))`.
    pub(crate) fn launch_attention_backward(
        &self,
        [q, k, v, o, lse, d_o]: [&Handle; 6],
        s: AttentionShape,
        kv: bool,
    ) -> Result<(Handle, Option<(Handle, Handle)>), DeviceError> {
        s.check("attention_backward", &[])?;
        let (ql, kl, rows) = (s.q_len(), s.kv_len(), s.rows());
        let (dq, delta) = (self.output(ql), self.output(rows));
        attention_backward_q::launch::<R>(
            self.client(),
            cubes(rows),
            CubeDim::new_1d(ATTENTION_BLOCK as u32),
            arg(q, ql),
            arg(k, kl),
            arg(v, kl),
            arg(o, ql),
            arg(d_o, ql),
            arg(lse, rows),
            arg(&dq, ql),
            arg(&delta, rows),
            rows as u32,
            s.seq as u32,
            s.head_dim as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.scale(),
            ATTENTION_BLOCK,
        );
        if !kv {
            return Ok((dq, None));
        }
        let (dk, dv) = (self.output(kl), self.output(kl));
        let kv_rows = s.batch * s.kv_heads * s.seq;
        attention_backward_kv::launch::<R>(
            self.client(),
            cubes(kv_rows),
            CubeDim::new_1d(ATTENTION_BLOCK as u32),
            arg(q, ql),
            arg(k, kl),
            arg(v, kl),
            arg(d_o, ql),
            arg(lse, rows),
            arg(&delta, rows),
            arg(&dk, kl),
            arg(&dv, kl),
            kv_rows as u32,
            s.seq as u32,
            s.head_dim as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.scale(),
            ATTENTION_BLOCK,
        );
        Ok((dq, Some((dk, dv))))
    }

    /// `(o, lse)` of causal attention, by [`attention_forward`].
    pub fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttentionShape,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        s.check(
            "attention",
            &[
                ("q", q.len(), s.q_len()),
                ("k", k.len(), s.kv_len()),
                ("v", v.len(), s.kv_len()),
            ],
        )?;
        let (qh, kh, vh) = (self.upload(q), self.upload(k), self.upload(v));
        let (oh, lh) = self.launch_attention([&qh, &kh, &vh], s)?;
        Ok((self.download(oh, s.q_len())?, self.download(lh, s.rows())?))
    }

    /// `(dq, dk, dv)` of `Σ do ∘ o`, from the forward's `o` and `lse`, by
    /// [`attention_backward_q`] then [`attention_backward_kv`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
        s: AttentionShape,
    ) -> Result<[Vec<f32>; 3], DeviceError> {
        s.check(
            "attention_backward",
            &[
                ("q", q.len(), s.q_len()),
                ("k", k.len(), s.kv_len()),
                ("v", v.len(), s.kv_len()),
                ("o", o.len(), s.q_len()),
                ("lse", lse.len(), s.rows()),
                ("do", d_o.len(), s.q_len()),
            ],
        )?;
        let up = |x: &[f32]| self.upload(x);
        let (qh, kh, vh, oh, lh, gh) = (up(q), up(k), up(v), up(o), up(lse), up(d_o));
        let (dq, dkv) = self.launch_attention_backward([&qh, &kh, &vh, &oh, &lh, &gh], s, true)?;
        let (dk, dv) = dkv.expect("requested");
        let (ql, kl) = (s.q_len(), s.kv_len());
        Ok([
            self.download(dq, ql)?,
            self.download(dk, kl)?,
            self.download(dv, kl)?,
        ])
    }
}

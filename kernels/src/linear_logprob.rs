//! Fused linear log-prob, forward: `logprob[t] = h[t]·W[y_t] − logsumexp_v
//! h[t]·W[v]` for hidden states `h [T, d]`, an LM head `W [V, d]` and
//! targets `y [T]`, without ever materialising the `[T, V]` logits. One cube
//! per token: its units stride over the vocabulary keeping an online
//! (max, Σexp) pair each, then merge the pairs in shared memory. Memory is
//! `O(T)` whatever the vocabulary; the log-sum-exp is written too, for the
//! backward pass.
//!
//! Written for correctness first: each unit computes whole dot products
//! serially and reads rows of W with a stride of d between neighbouring
//! units (uncoalesced). Reaching its bound (2·T·V·d FLOPs, compute-bound at
//! these shapes) needs tiles of tokens × vocabulary staged in shared memory,
//! as a GEMM does.
//!
//! The backward pass is two kernels of the same shape, recomputing the
//! logits chunk by chunk from `lse` instead of storing them: one cube per
//! token for `dh`, one cube per vocabulary row for `dW`.
//!
//! The device executor runs the IR's `linear_logprob` op (and a matched
//! log-softmax-of-logits subgraph) with the forward kernel, and each
//! `linear_logprob_grad` op with the forward (for the log-sum-exp) and one
//! backward kernel. A target outside `0..V` makes its row NaN.

use crate::device::{arg, cubes, Device, DeviceError};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Units per cube.
pub const LOGPROB_BLOCK: usize = 256;

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

/// Launch with one cube per token and `CubeDim(block)`; `block` a power of
/// two. Targets are whole numbers in `0..vocab`. Token `t` reads row
/// `(t / seq_out) · seq_in + t % seq_out` of `h` (sequences of `seq_in`
/// hidden states of which the first `seq_out` are scored; `seq_out =
/// seq_in` for all of them).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_forward(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    logprob: &mut Array<f32>,
    lse: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    seq_out: u32,
    seq_in: u32,
    #[comptime] block: usize,
) {
    let t = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if t >= n_tokens as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let d = d as usize;
    let vocab = vocab as usize;
    // A target outside 0..vocab gives NaN, as a checked gather does.
    let tf = targets[t];
    let inside = tf >= f32::new(0.0) && tf < f32::cast_from(vocab as u32);
    let target = u32::cast_from(select(inside, tf, f32::new(0.0))) as usize;
    // Token t's row of h: rows come in sequences of `seq_in`, of which the
    // first `seq_out` are scored (all of them when the two are equal).
    let h0 = ((t / seq_out as usize) * seq_in as usize + t % seq_out as usize) * d;
    let mut maxes = SharedMemory::<f32>::new(block);
    let mut sums = SharedMemory::<f32>::new(block);
    let mut target_logit = SharedMemory::<f32>::new(1usize);
    // Run-time constants (WGSL has no literal for −∞; mutable variables
    // must start from run-time values).
    let zero = h[h0] * f32::new(0.0);
    let mut m = zero - f32::new(3.0e38);
    let mut s = zero;
    let mut v = tid;
    while v < vocab {
        let mut z = zero;
        let mut j = tid * 0usize;
        while j < d {
            z += h[h0 + j] * w[v * d + j];
            j += 1usize;
        }
        if v == target {
            target_logit[0usize] = z;
        }
        let mn = max(m, z);
        s = s * (m - mn).exp() + (z - mn).exp();
        m = mn;
        v += block;
    }
    let l = cube_log_sum_exp(m, s, &mut maxes, &mut sums, tid);
    if tid == 0 {
        lse[t] = l;
        logprob[t] = select(inside, target_logit[0usize] - l, zero / zero);
    }
}

/// `dh[t] = g[t] · (W[y_t] − Σ_v p_tv W[v])` with `p_tv = exp(h[t]·W[v] −
/// lse[t])`. One cube per token; each chunk of `block` vocabulary rows is
/// scored into shared memory, then every unit adds the chunk's share to the
/// columns it owns.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_backward_h(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    dh: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    #[comptime] block: usize,
) {
    let t = CUBE_POS;
    if t >= n_tokens as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let d = d as usize;
    let vocab = vocab as usize;
    // A target outside 0..vocab makes the row NaN, as in the forward.
    let tf = targets[t];
    let inside = tf >= f32::new(0.0) && tf < f32::cast_from(vocab as u32);
    let target = u32::cast_from(select(inside, tf, f32::new(0.0))) as usize;
    let zero = h[t * d] * f32::new(0.0);
    let (l, g) = (lse[t], select(inside, grad[t], zero / zero));
    let mut p = SharedMemory::<f32>::new(block);
    // dh starts as g·W[y_t].
    let mut j = tid;
    while j < d {
        dh[t * d + j] = g * w[target * d + j];
        j += block;
    }
    let mut v0 = tid * 0usize;
    while v0 < vocab {
        let v = v0 + tid;
        let mut z = zero;
        if v < vocab {
            let mut k = tid * 0usize;
            while k < d {
                z += h[t * d + k] * w[v * d + k];
                k += 1usize;
            }
        }
        p[tid] = select(v < vocab, (z - l).exp(), zero);
        sync_cube();
        let mut j2 = tid;
        while j2 < d {
            let mut acc = zero;
            let mut c = tid * 0usize;
            while c < block && v0 + c < vocab {
                acc += p[c] * w[(v0 + c) * d + j2];
                c += 1usize;
            }
            dh[t * d + j2] -= g * acc;
            j2 += block;
        }
        sync_cube();
        v0 += block;
    }
}

/// `dW[v] = Σ_t g[t] · (1[y_t = v] − p_tv) · h[t]`. One cube per vocabulary
/// row; each chunk of `block` tokens is scored into shared memory, then
/// every unit adds the chunk's share to the columns it owns.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_backward_w(
    h: &Array<f32>,
    w: &Array<f32>,
    targets: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    dw: &mut Array<f32>,
    n_tokens: u32,
    d: u32,
    vocab: u32,
    #[comptime] block: usize,
) {
    let v = CUBE_POS;
    if v >= vocab as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let d = d as usize;
    let n_tokens = n_tokens as usize;
    let mut coef = SharedMemory::<f32>::new(block);
    let zero = w[v * d] * f32::new(0.0);
    let mut j = tid;
    while j < d {
        dw[v * d + j] = zero;
        j += block;
    }
    let mut t0 = tid * 0usize;
    while t0 < n_tokens {
        let t = t0 + tid;
        let mut c = zero;
        if t < n_tokens {
            let mut z = zero;
            let mut k = tid * 0usize;
            while k < d {
                z += h[t * d + k] * w[v * d + k];
                k += 1usize;
            }
            // A target outside 0..vocab makes its token's share NaN.
            let tf = targets[t];
            let inside = tf >= f32::new(0.0) && tf < f32::cast_from(vocab);
            let target = u32::cast_from(select(inside, tf, f32::new(0.0))) as usize;
            let hit = select(target == v, f32::new(1.0), zero);
            let gt = select(inside, grad[t], zero / zero);
            c = gt * (hit - (z - lse[t]).exp());
        }
        coef[tid] = c;
        sync_cube();
        let mut j2 = tid;
        while j2 < d {
            let mut acc = zero;
            let mut r = tid * 0usize;
            while r < block && t0 + r < n_tokens {
                acc += coef[r] * h[(t0 + r) * d + j2];
                r += 1usize;
            }
            dw[v * d + j2] += acc;
            j2 += block;
        }
        sync_cube();
        t0 += block;
    }
}

/// Every target a whole number in `0..vocab`.
fn check_targets(what: &str, targets: &[f32], vocab: usize) -> Result<(), DeviceError> {
    let token = |y: f32| y >= 0.0 && y < vocab as f32 && y.fract() == 0.0;
    match targets.iter().position(|&y| !token(y)) {
        Some(i) => Err(DeviceError::Device(format!(
            "{what}: target {i} is {}, not a token id in 0..{vocab}",
            targets[i]
        ))),
        None => Ok(()),
    }
}

/// Sizes of one linear log-prob: `n` scored rows, `d` features, `vocab`
/// rows of `w`; scored row `t` reads row `(t / seq_out) · seq_in + t %
/// seq_out` of `h` (`seq_out = seq_in = n`: row t).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogprobShape {
    pub n: usize,
    pub d: usize,
    pub vocab: usize,
    pub seq_out: usize,
    pub seq_in: usize,
}

impl<R: Runtime> Device<R> {
    /// Launches [`linear_logprob_forward`] on device buffers (`h`'s length
    /// `h_len`): `(logprob, lse)`.
    pub(crate) fn launch_linear_logprob(
        &self,
        [h, w, targets]: [&Handle; 3],
        h_len: usize,
        s: LogprobShape,
    ) -> (Handle, Handle) {
        let (out, lse) = (self.output(s.n), self.output(s.n));
        linear_logprob_forward::launch::<R>(
            self.client(),
            cubes(s.n),
            CubeDim::new_1d(LOGPROB_BLOCK as u32),
            arg(h, h_len),
            arg(w, s.vocab * s.d),
            arg(targets, s.n),
            arg(&out, s.n),
            arg(&lse, s.n),
            s.n as u32,
            s.d as u32,
            s.vocab as u32,
            s.seq_out as u32,
            s.seq_in as u32,
            LOGPROB_BLOCK,
        );
        (out, lse)
    }

    /// Launches [`linear_logprob_backward_w`] (`weights`) or
    /// [`linear_logprob_backward_h`] on device buffers, `h` being `[n, d]`.
    pub(crate) fn launch_linear_logprob_backward(
        &self,
        [h, w, targets, lse, grad]: [&Handle; 5],
        s: LogprobShape,
        weights: bool,
    ) -> Handle {
        let (n, d, vocab) = (s.n, s.d, s.vocab);
        let a = |x: &Handle, len: usize| arg::<R>(x, len);
        if weights {
            let dw = self.output(vocab * d);
            linear_logprob_backward_w::launch::<R>(
                self.client(),
                cubes(vocab),
                CubeDim::new_1d(LOGPROB_BLOCK as u32),
                a(h, n * d),
                a(w, vocab * d),
                a(targets, n),
                a(lse, n),
                a(grad, n),
                a(&dw, vocab * d),
                n as u32,
                d as u32,
                vocab as u32,
                LOGPROB_BLOCK,
            );
            dw
        } else {
            let dh = self.output(n * d);
            linear_logprob_backward_h::launch::<R>(
                self.client(),
                cubes(n),
                CubeDim::new_1d(LOGPROB_BLOCK as u32),
                a(h, n * d),
                a(w, vocab * d),
                a(targets, n),
                a(lse, n),
                a(grad, n),
                a(&dh, n * d),
                n as u32,
                d as u32,
                vocab as u32,
                LOGPROB_BLOCK,
            );
            dh
        }
    }

    /// `(logprob [T], lse [T])` of `targets` under the logits `h Wᵀ`, with
    /// `h [T, d]` and `w [V, d]` row-major and targets whole numbers in
    /// `0..V`, computed by [`linear_logprob_forward`].
    pub fn linear_logprob(
        &self,
        h: &[f32],
        w: &[f32],
        targets: &[f32],
        d: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let t = targets.len();
        let vocab = w.len() / d.max(1);
        if h.len() != t * d || w.len() != vocab * d || t == 0 || vocab == 0 {
            return Err(DeviceError::Device(format!(
                "linear_logprob: h has {} elements, w {}, {t} targets, d = {d}",
                h.len(),
                w.len()
            )));
        }
        check_targets("linear_logprob", targets, vocab)?;
        let (hh, wh, th) = (self.upload(h), self.upload(w), self.upload(targets));
        let shape = LogprobShape {
            n: t,
            d,
            vocab,
            seq_out: t,
            seq_in: t,
        };
        let (lp, lse) = self.launch_linear_logprob([&hh, &wh, &th], h.len(), shape);
        Ok((self.download(lp, t)?, self.download(lse, t)?))
    }

    /// `(dh [T, d], dW [V, d])` of `Σ_t grad[t] · logprob[t]`, from the
    /// forward's `lse`, by [`linear_logprob_backward_h`] and
    /// [`linear_logprob_backward_w`].
    pub fn linear_logprob_backward(
        &self,
        h: &[f32],
        w: &[f32],
        targets: &[f32],
        lse: &[f32],
        grad: &[f32],
        d: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let t = targets.len();
        let vocab = w.len() / d.max(1);
        if h.len() != t * d || lse.len() != t || grad.len() != t || t == 0 || vocab == 0 {
            return Err(DeviceError::Device(format!(
                "linear_logprob_backward: h has {} elements, w {}, {t} targets, lse {}, grad {}, d = {d}",
                h.len(),
                w.len(),
                lse.len(),
                grad.len()
            )));
        }
        check_targets("linear_logprob_backward", targets, vocab)?;
        let up = |x: &[f32]| self.upload(x);
        let (hh, wh, th, lh, gh) = (up(h), up(w), up(targets), up(lse), up(grad));
        let shape = LogprobShape {
            n: t,
            d,
            vocab,
            seq_out: t,
            seq_in: t,
        };
        let ops = [&hh, &wh, &th, &lh, &gh];
        let dh = self.launch_linear_logprob_backward(ops, shape, false);
        let dw = self.launch_linear_logprob_backward(ops, shape, true);
        Ok((self.download(dh, t * d)?, self.download(dw, vocab * d)?))
    }
}

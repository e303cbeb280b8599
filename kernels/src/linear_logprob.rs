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
//! as a GEMM does. The backward pass (chunked over the vocabulary) is not
//! written yet.

use crate::device::{Device, DeviceError};
use cubecl::prelude::*;

/// Units per cube.
pub const LOGPROB_BLOCK: usize = 256;

/// Launch with one cube per token and `CubeDim(block)`; `block` a power of
/// two. Targets are whole numbers in `0..vocab`.
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
    let target = u32::cast_from(targets[t]) as usize;
    let mut maxes = SharedMemory::<f32>::new(block);
    let mut sums = SharedMemory::<f32>::new(block);
    let mut target_logit = SharedMemory::<f32>::new(1usize);
    // Run-time constants (WGSL has no literal for −∞; mutable variables
    // must start from run-time values).
    let zero = h[t * d] * f32::new(0.0);
    let mut m = zero - f32::new(3.0e38);
    let mut s = zero;
    let mut v = tid;
    while v < vocab {
        let mut z = zero;
        let mut j = tid * 0usize;
        while j < d {
            z += h[t * d + j] * w[v * d + j];
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
    if tid == 0 {
        let l = maxes[0usize] + sums[0usize].ln();
        lse[t] = l;
        logprob[t] = target_logit[0usize] - l;
    }
}

impl<R: Runtime> Device<R> {
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
        let (hh, wh, th) = (self.upload(h), self.upload(w), self.upload(targets));
        let (lp, lse) = (self.output(t), self.output(t));
        let x = (t as u32).min(65_535);
        let arg = |h: &cubecl::server::Handle, n: usize| unsafe {
            ArrayArg::<R>::from_raw_parts(h.clone(), n)
        };
        linear_logprob_forward::launch::<R>(
            self.client(),
            CubeCount::Static(x, (t as u32).div_ceil(x), 1),
            CubeDim::new_1d(LOGPROB_BLOCK as u32),
            arg(&hh, h.len()),
            arg(&wh, w.len()),
            arg(&th, t),
            arg(&lp, t),
            arg(&lse, t),
            t as u32,
            d as u32,
            vocab as u32,
            LOGPROB_BLOCK,
        );
        Ok((self.download(lp, t)?, self.download(lse, t)?))
    }
}

//! RMSNorm (`Op::RmsNorm`) and its gradients (`Op::RmsNormGrad`) as
//! hand-written kernels over `x [rows, d]` with gain `w [d]`; each row's
//! `r = 1 / √(mean(x²) + eps)` is recomputed by the kernel that needs it.
//!
//! - forward and `dx`: one cube per row of `block` units; each unit walks
//!   the columns `tid, tid + block, …`, the cube sums `x²` (and for `dx`
//!   `dy ∘ w ∘ x`) in shared memory, then writes its columns: `y = x r w`,
//!   `dx = r (dy ∘ w) − x r³ Σ(dy ∘ w ∘ x) / d`. One read of each operand
//!   per element besides the sums' pass.
//! - `dw = Σ_rows dy ∘ x · r`: [`rms_norm_inv_rms`] writes each row's `r`
//!   (one cube per row), then [`rms_norm_backward_w`] gives each cube
//!   `NORM_COLS` columns and `NORM_LANES` lanes of rows: unit `(c, l)`
//!   sums rows `l, l + NORM_LANES, …` of its column (reads coalesced along
//!   the row), and the lanes' partial sums are added in shared memory.

use crate::sample::cube_sum;
use cubecl::prelude::*;

/// Units per cube of the row kernels.
pub const NORM_BLOCK: usize = 256;
/// Columns per cube of the `dw` kernel.
pub const NORM_COLS: usize = 32;
/// Lanes of rows per cube of the `dw` kernel.
pub const NORM_LANES: usize = 8;

/// `1 / √(Σ_j x[base + j]² / d + eps)` over the cube's row.
#[cube]
fn row_inv_rms(
    x: &Array<f32>,
    base: usize,
    d: usize,
    eps: f32,
    shared: &mut SharedMemory<f32>,
    tid: usize,
    #[comptime] block: usize,
) -> f32 {
    let mut ss = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut j = tid;
    while j < d {
        let v = x[base + j];
        ss += v * v;
        j += block;
    }
    let total = cube_sum(ss, shared, tid);
    let mean = total / f32::cast_from(d as u32);
    f32::new(1.0) / (mean + eps).sqrt()
}

/// `out = x · r · w`, one cube per row.
#[cube(launch)]
pub fn rms_norm_forward(
    x: &Array<f32>,
    w: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    d: u32,
    eps: f32,
    #[comptime] block: usize,
) {
    let row = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if row >= rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let d = d as usize;
    let base = row * d;
    let mut shared = SharedMemory::<f32>::new(block);
    let r = row_inv_rms(x, base, d, eps, &mut shared, tid, block);
    let mut j = tid;
    while j < d {
        out[base + j] = x[base + j] * r * w[j];
        j += block;
    }
}

/// `out = r (dy ∘ w) − x r³ Σ(dy ∘ w ∘ x) / d`, one cube per row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward_x(
    x: &Array<f32>,
    w: &Array<f32>,
    dy: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    d: u32,
    eps: f32,
    #[comptime] block: usize,
) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let d = d as usize;
    let base = row * d;
    let mut shared = SharedMemory::<f32>::new(block);
    let r = row_inv_rms(x, base, d, eps, &mut shared, tid, block);
    let mut dot = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut j = tid;
    while j < d {
        dot += dy[base + j] * w[j] * x[base + j];
        j += block;
    }
    let dot = cube_sum(dot, &mut shared, tid);
    let c = r * r * r * dot / f32::cast_from(d as u32);
    let mut j2 = tid;
    while j2 < d {
        out[base + j2] = r * (dy[base + j2] * w[j2]) - x[base + j2] * c;
        j2 += block;
    }
}

/// `out[row] = r` of each row, one cube per row.
#[cube(launch)]
pub fn rms_norm_inv_rms(
    x: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    d: u32,
    eps: f32,
    #[comptime] block: usize,
) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let tid = UNIT_POS as usize;
    let d = d as usize;
    let mut shared = SharedMemory::<f32>::new(block);
    let r = row_inv_rms(x, row * d, d, eps, &mut shared, tid, block);
    if tid == 0usize {
        out[row] = r;
    }
}

/// `out[j] = Σ_rows dy[row, j] · x[row, j] · r[row]`: a cube of `cols ×
/// lanes` units per `cols` columns.
#[cube(launch)]
pub fn rms_norm_backward_w(
    x: &Array<f32>,
    dy: &Array<f32>,
    r: &Array<f32>,
    out: &mut Array<f32>,
    rows: u32,
    d: u32,
    #[comptime] cols: usize,
    #[comptime] lanes: usize,
) {
    let (c, l) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let (rows, d) = (rows as usize, d as usize);
    let j = CUBE_POS * cols + c;
    let mut partial = SharedMemory::<f32>::new(cols * lanes);
    let mut acc = f32::cast_from(UNIT_POS) * f32::new(0.0);
    if j < d {
        let mut row = l;
        while row < rows {
            let o = row * d + j;
            acc += dy[o] * (x[o] * r[row]);
            row += lanes;
        }
    }
    partial[l * cols + c] = acc;
    sync_cube();
    if l == 0usize && j < d {
        let mut total = partial[c];
        let mut q = 1usize;
        while q < lanes {
            total += partial[q * cols + c];
            q += 1usize;
        }
        out[j] = total;
    }
}

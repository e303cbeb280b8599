//! Batched matrix product `[B, m, k] × [B, k, n] → [B, m, n]`, tiled through
//! shared memory: each cube computes a `TILE × TILE` block of one batch
//! entry, staging `TILE`-wide panels of both operands. An operand can be
//! read transposed (`a` stored `[B, k, m]`, `b` stored `[B, n, k]`), so a
//! transpose that only feeds matrix products is never written out.

use cubecl::prelude::*;

pub const TILE: usize = 16;

#[cube]
fn load_or_zero(a: &Array<f32>, at: usize, inside: bool) -> f32 {
    let v = a[select(inside, at, 0usize)];
    select(inside, v, f32::new(0.0))
}

/// Launch with `CubeDim(TILE, TILE)` and
/// `CubeCount(ceil(n / TILE), ceil(m / TILE), B)`.
#[cube(launch)]
pub fn matmul_tiled(
    a: &Array<f32>,
    b: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    k: u32,
    n: u32,
    #[comptime] tile: usize,
    #[comptime] trans_a: bool,
    #[comptime] trans_b: bool,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    let t = tile;
    let batch = CUBE_POS_Z as usize;
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let row = CUBE_POS_Y as usize * t + ty;
    let col = CUBE_POS_X as usize * t + tx;
    let mut sa = SharedMemory::<f32>::new(tile * tile);
    let mut sb = SharedMemory::<f32>::new(tile * tile);
    let a_base = batch * m * k;
    let b_base = batch * k * n;
    let mut acc = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    let mut k0 = (UNIT_POS_X * 0) as usize;
    while k0 < k {
        let ac = k0 + tx;
        let a_at = if trans_a {
            a_base + ac * m + row
        } else {
            a_base + row * k + ac
        };
        sa[ty * t + tx] = load_or_zero(a, a_at, row < m && ac < k);
        let br = k0 + ty;
        let b_at = if trans_b {
            b_base + col * k + br
        } else {
            b_base + br * n + col
        };
        sb[ty * t + tx] = load_or_zero(b, b_at, br < k && col < n);
        sync_cube();
        for q in 0..t {
            acc += sa[ty * t + q] * sb[q * t + tx];
        }
        sync_cube();
        k0 += t;
    }
    if row < m && col < n {
        out[batch * m * n + row * n + col] = acc;
    }
}

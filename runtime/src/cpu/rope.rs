//! Rotate-half rotary position embedding (`Op::Rope`) and its transpose,
//! over rows of `x [..., T, hd]` with tables `cos, sin [T, hd]`.

use super::{for_chunks, rows_per_task, PAR_MIN_ELEMS};
use num_traits::Float;

/// `x ∘ cos + rot(x) ∘ sin`, or with `transpose` `x ∘ cos + rotᵀ(x ∘ sin)`,
/// where `rot(x) = [−x[h..], x[..h]]` and `rotᵀ(u) = [u[h..], −u[..h]]`
/// along rows of `hd = cos.len() / t` elements; row `r` of `x` uses table
/// row `r % t`.
pub fn rope<T: Float + Send + Sync>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    t: usize,
    transpose: bool,
) -> Vec<T> {
    let hd = cos.len() / t.max(1);
    let h = hd / 2;
    let mut out = vec![T::zero(); x.len()];
    if hd == 0 {
        return out;
    }
    let rows_per_chunk = rows_per_task(hd);
    for_chunks(
        &mut out,
        rows_per_chunk * hd,
        x.len() >= PAR_MIN_ELEMS,
        |start, chunk| {
            for (i, y) in chunk.chunks_mut(hd).enumerate() {
                let row = start / hd + i;
                let xr = &x[row * hd..(row + 1) * hd];
                let p = (row % t) * hd;
                let (c, s) = (&cos[p..p + hd], &sin[p..p + hd]);
                for j in 0..hd {
                    let rot = match (transpose, j < h) {
                        (false, true) => -xr[j + h] * s[j],
                        (false, false) => xr[j - h] * s[j],
                        (true, true) => xr[j + h] * s[j + h],
                        (true, false) => -(xr[j - h] * s[j - h]),
                    };
                    y[j] = xr[j] * c[j] + rot;
                }
            }
        },
    );
    out
}

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
                // Each half in its own loop, which the compiler vectorises.
                let (x0, x1) = xr[..2 * h].split_at(h);
                let (y0, y1) = y[..2 * h].split_at_mut(h);
                let (c0, c1) = c[..2 * h].split_at(h);
                let (s0, s1) = s[..2 * h].split_at(h);
                if transpose {
                    for j in 0..h {
                        y0[j] = x0[j] * c0[j] + x1[j] * s1[j];
                        y1[j] = x1[j] * c1[j] + -(x0[j] * s0[j]);
                    }
                } else {
                    for j in 0..h {
                        y0[j] = x0[j] * c0[j] + -x1[j] * s0[j];
                        y1[j] = x1[j] * c1[j] + x0[j] * s1[j];
                    }
                }
                // An odd head dimension's last element has no partner.
                for j in 2 * h..hd {
                    let rot = if transpose {
                        -(xr[j - h] * s[j - h])
                    } else {
                        xr[j - h] * s[j]
                    };
                    y[j] = xr[j] * c[j] + rot;
                }
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element by element, as the rule reads.
    fn naive(x: &[f32], cos: &[f32], sin: &[f32], t: usize, transpose: bool) -> Vec<f32> {
        let hd = cos.len() / t;
        let h = hd / 2;
        let mut y = vec![0.0; x.len()];
        for (r, (yr, xr)) in y.chunks_mut(hd).zip(x.chunks(hd)).enumerate() {
            let p = (r % t) * hd;
            let (c, s) = (&cos[p..p + hd], &sin[p..p + hd]);
            for j in 0..hd {
                let rot = match (transpose, j < h) {
                    (false, true) => -xr[j + h] * s[j],
                    (false, false) => xr[j - h] * s[j],
                    (true, true) => xr[j + h] * s[j + h],
                    (true, false) => -(xr[j - h] * s[j - h]),
                };
                yr[j] = xr[j] * c[j] + rot;
            }
        }
        y
    }

    #[test]
    fn rope_equals_the_elementwise_rule_bit_for_bit() {
        let f = |i: usize, k: f32| (i as f32 * k).sin();
        for (t, hd, rows) in [(4, 8, 12), (3, 7, 9), (5, 64, 40000 / 64)] {
            let x: Vec<f32> = (0..rows * hd).map(|i| f(i, 0.71)).collect();
            let cos: Vec<f32> = (0..t * hd).map(|i| f(i, 0.13)).collect();
            let sin: Vec<f32> = (0..t * hd).map(|i| f(i, 0.29)).collect();
            for transpose in [false, true] {
                let got = rope(&x, &cos, &sin, t, transpose);
                let want = naive(&x, &cos, &sin, t, transpose);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "t {t} hd {hd} transpose {transpose}"
                );
            }
        }
    }
}

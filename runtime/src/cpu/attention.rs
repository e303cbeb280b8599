//! Causal softmax attention and its gradients, row by row: the `[T, T]`
//! probabilities are recomputed from each query row's log-sum-exp where
//! they are needed and never stored. Layouts (row-major): `q, o, do` are
//! `[B, H, T, hd]`, `k, v` are `[B, H_kv, T, hd]`; query head `h` reads
//! key/value head `h / (H / H_kv)`.
//!
//! Every output row is computed by one task with a fixed sequence of
//! operations, so results do not depend on the number of threads.

use super::{for_chunks, PAR_GRAIN, PAR_MIN_ELEMS};
use crate::tensor::Element;
use coopc_compiler::ir::AttentionOperand;
use num_traits::Float;

/// Sizes of one attention.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl Dims {
    /// From the shapes of q `[B, H, T, hd]` and k `[B, H_kv, T, hd]`.
    pub fn of(q: &[usize], k: &[usize]) -> Dims {
        Dims {
            batch: q[0],
            heads: q[1],
            kv_heads: k[1],
            seq: q[2],
            head_dim: q[3],
        }
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// First element of query row `r` (over `[B, H, T]`).
    fn q_row(&self, r: usize) -> usize {
        r * self.head_dim
    }

    /// First element of key/value row `j` of the head that query row `r`
    /// (over `[B, H, T]`) reads.
    fn kv_row(&self, r: usize, j: usize) -> usize {
        let bh = r / self.seq;
        let kvh = (bh / self.heads) * self.kv_heads + (bh % self.heads) / self.group();
        (kvh * self.seq + j) * self.head_dim
    }

    fn scale<T: Float>(&self) -> T {
        T::one() / T::from(self.head_dim).unwrap().sqrt()
    }

    /// Rows per parallel task for work `per_row` elements per row, and
    /// whether to split at all.
    fn tasks(&self, rows: usize, per_row: usize) -> (usize, bool) {
        let chunk = (PAR_GRAIN / per_row.max(1)).max(1) * self.head_dim;
        (chunk, rows * per_row >= PAR_MIN_ELEMS)
    }
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

/// The scaled scores of query row `r` against keys `0..=i` into `s`, and
/// the row's log-sum-exp.
fn scores<T: Float>(d: &Dims, q: &[T], k: &[T], r: usize, s: &mut Vec<T>) -> T {
    let i = r % d.seq;
    let hd = d.head_dim;
    let qi = &q[d.q_row(r)..d.q_row(r) + hd];
    let scale = d.scale::<T>();
    s.clear();
    let mut m = T::neg_infinity();
    for j in 0..=i {
        let kj = &k[d.kv_row(r, j)..d.kv_row(r, j) + hd];
        let z = dot(qi, kj) * scale;
        m = if z > m || z.is_nan() { z } else { m };
        s.push(z);
    }
    let sum = s.iter().fold(T::zero(), |a, &z| a + (z - m).exp());
    m + sum.ln()
}

/// `softmax(q kᵀ / √hd + causal) v`.
pub fn forward<T: Float + Element>(d: &Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let hd = d.head_dim;
    let rows = d.batch * d.heads * d.seq;
    let mut out = vec![T::zero(); rows * hd];
    let (chunk, par) = d.tasks(rows, d.seq * hd);
    for_chunks(&mut out, chunk, par, |start, part| {
        let mut s = Vec::with_capacity(d.seq);
        for (n, o) in part.chunks_mut(hd).enumerate() {
            let r = start / hd + n;
            let lse = scores(d, q, k, r, &mut s);
            for (j, &z) in s.iter().enumerate() {
                let p = (z - lse).exp();
                let vj = &v[d.kv_row(r, j)..d.kv_row(r, j) + hd];
                for (od, &vd) in o.iter_mut().zip(vj) {
                    *od = *od + p * vd;
                }
            }
        }
    });
    out
}

/// The gradient of `Σ do ∘ o` (`o` the forward's value) with respect to
/// `wrt`: `dS = P ∘ (do vᵀ − rowsum(do ∘ o)) / √hd`, `dq = dS k`, `dk =
/// dSᵀ q`, `dv = Pᵀ do`, key and value rows summed over the query heads of
/// their group.
pub fn grad<T: Float + Element>(
    d: &Dims,
    wrt: AttentionOperand,
    [q, k, v, o, d_o]: [&[T]; 5],
) -> Vec<T> {
    let hd = d.head_dim;
    let rows = d.batch * d.heads * d.seq;
    let scale = d.scale::<T>();
    let delta = |r: usize| {
        dot(
            &d_o[d.q_row(r)..d.q_row(r) + hd],
            &o[d.q_row(r)..d.q_row(r) + hd],
        )
    };
    if wrt == AttentionOperand::Q {
        let mut dq = vec![T::zero(); rows * hd];
        let (chunk, par) = d.tasks(rows, 2 * d.seq * hd);
        for_chunks(&mut dq, chunk, par, |start, part| {
            let mut s = Vec::with_capacity(d.seq);
            for (n, out) in part.chunks_mut(hd).enumerate() {
                let r = start / hd + n;
                let lse = scores(d, q, k, r, &mut s);
                let dr = delta(r);
                let doi = &d_o[d.q_row(r)..d.q_row(r) + hd];
                for (j, &z) in s.iter().enumerate() {
                    let kv = d.kv_row(r, j);
                    let ds = (z - lse).exp() * (dot(doi, &v[kv..kv + hd]) - dr) * scale;
                    for (od, &kd) in out.iter_mut().zip(&k[kv..kv + hd]) {
                        *od = *od + ds * kd;
                    }
                }
            }
        });
        return dq;
    }
    // Key/value rows: every query row's log-sum-exp (and, for dk, its
    // delta) first, then one task per key/value row over the queries
    // i ≥ j of every head of its group.
    let mut lse = vec![T::zero(); rows];
    let (chunk, par) = d.tasks(rows, d.seq * hd);
    for_chunks(&mut lse, (chunk / hd).max(1), par, |start, part| {
        let mut s = Vec::with_capacity(d.seq);
        for (n, l) in part.iter_mut().enumerate() {
            *l = scores(d, q, k, start + n, &mut s);
        }
    });
    let deltas: Vec<T> = if wrt == AttentionOperand::K {
        (0..rows).map(delta).collect()
    } else {
        Vec::new()
    };
    let kv_rows = d.batch * d.kv_heads * d.seq;
    let mut out = vec![T::zero(); kv_rows * hd];
    let (chunk, par) = d.tasks(kv_rows, 2 * d.group() * d.seq * hd);
    for_chunks(&mut out, chunk, par, |start, part| {
        for (n, acc) in part.chunks_mut(hd).enumerate() {
            let c = start / hd + n;
            let (bkv, j) = (c / d.seq, c % d.seq);
            let (b, kvh) = (bkv / d.kv_heads, bkv % d.kv_heads);
            let kj = &k[c * hd..(c + 1) * hd];
            let vj = &v[c * hd..(c + 1) * hd];
            for h in kvh * d.group()..(kvh + 1) * d.group() {
                for i in j..d.seq {
                    let r = (b * d.heads + h) * d.seq + i;
                    let qi = &q[d.q_row(r)..d.q_row(r) + hd];
                    let doi = &d_o[d.q_row(r)..d.q_row(r) + hd];
                    let p = (dot(qi, kj) * scale - lse[r]).exp();
                    let (w, src) = match wrt {
                        AttentionOperand::V => (p, doi),
                        _ => (p * (dot(doi, vj) - deltas[r]) * scale, qi),
                    };
                    for (a, &x) in acc.iter_mut().zip(src) {
                        *a = *a + w * x;
                    }
                }
            }
        }
    });
    out
}

//! Causal softmax attention and its gradients, one head at a time: a
//! head's `[T, T]` probabilities are recomputed by the GEMM into scratch
//! memory where they are needed and freed with the head, so no
//! `[B, H, T, T]` buffer ever exists. Layouts (row-major): `q, o, do` are
//! `[B, H, T, hd]`, `k, v` are `[B, H_kv, T, hd]`; query head `h` reads
//! key/value head `h / (H / H_kv)`.
//!
//! Heads run in parallel, each output head computed by one task with a
//! fixed sequence of operations, so results do not depend on the number of
//! threads.

use super::for_chunks;
use super::matmul::{matmul_t, Gemm};
use crate::tensor::Element;
use coopc_ir::{AttentionOperand, BinaryOp};

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

    /// Elements of one head's `[T, hd]` block.
    fn head_len(&self) -> usize {
        self.seq * self.head_dim
    }

    /// Query head `qh` (over `[B, H]`) as a slice of `x` (`[B, H, T, hd]`).
    fn q_head<'a, T>(&self, x: &'a [T], qh: usize) -> &'a [T] {
        &x[qh * self.head_len()..(qh + 1) * self.head_len()]
    }

    /// The key/value head query head `qh` reads, as a slice of `x`
    /// (`[B, H_kv, T, hd]`).
    fn kv_of<'a, T>(&self, x: &'a [T], qh: usize) -> &'a [T] {
        let kvh = (qh / self.heads) * self.kv_heads + (qh % self.heads) / self.group();
        &x[kvh * self.head_len()..(kvh + 1) * self.head_len()]
    }

    fn scale<T: Gemm>(&self) -> T {
        T::one() / T::from(self.head_dim).unwrap().sqrt()
    }
}

/// The causal softmax probabilities `[T, T]` of one head: `softmax(q kᵀ /
/// √hd)` over the keys `j ≤ i` of each row (0 after it).
fn probs<T: Gemm + Element>(d: &Dims, q: &[T], k: &[T]) -> Vec<T> {
    let (t, hd) = (d.seq, d.head_dim);
    let mut p = matmul_t(q, false, k, true, 1, t, hd, t);
    let scale = d.scale::<T>();
    for (i, row) in p.chunks_mut(t).enumerate() {
        let m = row[..=i]
            .iter()
            .fold(T::neg_infinity(), |a, &x| BinaryOp::Max.apply(a, x * scale));
        for x in &mut row[..=i] {
            *x = *x * scale - m;
        }
        T::exp_in_place(&mut row[..=i]);
        let sum = row[..=i].iter().fold(T::zero(), |a, &x| a + x);
        for x in &mut row[..=i] {
            *x = *x / sum;
        }
        for x in &mut row[i + 1..] {
            *x = T::zero();
        }
    }
    p
}

/// `dS = P ∘ (do vᵀ − rowsum(do ∘ o)) / √hd` of one head (`[T, T]`).
fn score_grads<T: Gemm + Element>(d: &Dims, p: &[T], v: &[T], o: &[T], d_o: &[T]) -> Vec<T> {
    let (t, hd) = (d.seq, d.head_dim);
    let mut ds = matmul_t(d_o, false, v, true, 1, t, hd, t);
    let scale = d.scale::<T>();
    for (i, row) in ds.chunks_mut(t).enumerate() {
        let (oi, doi) = (&o[i * hd..(i + 1) * hd], &d_o[i * hd..(i + 1) * hd]);
        let delta = oi.iter().zip(doi).fold(T::zero(), |a, (&x, &y)| a + x * y);
        for (x, &pij) in row.iter_mut().zip(&p[i * t..(i + 1) * t]) {
            *x = pij * (*x - delta) * scale;
        }
    }
    ds
}

/// `softmax(q kᵀ / √hd + causal) v`.
pub fn forward<T: Gemm + Element>(d: &Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let (t, hd) = (d.seq, d.head_dim);
    let mut out = vec![T::zero(); d.batch * d.heads * d.head_len()];
    let work = d.batch * d.heads * t * t * hd;
    for_chunks(&mut out, d.head_len(), work > 1 << 15, |start, part| {
        for (n, o) in part.chunks_mut(d.head_len().max(1)).enumerate() {
            let qh = start / d.head_len().max(1) + n;
            let p = probs(d, d.q_head(q, qh), d.kv_of(k, qh));
            o.copy_from_slice(&matmul_t(&p, false, d.kv_of(v, qh), false, 1, t, t, hd));
        }
    });
    out
}

/// `cached_attention`: for each query row `[hd]` of `q` (`[B, H, 1, hd]`),
/// `softmax(q kᵀ / √hd) v` over the cache rows `0..=pos` (`pos` clamped to
/// the cache; NaN for a negative one) of its key/value head in `k, v`
/// (`[B, H_kv, L, hd]`, `cache_len` = L).
pub fn cached<T: Gemm + Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    [heads, kv_heads, hd]: [usize; 3],
    cache_len: usize,
    pos: i32,
) -> Vec<T> {
    let d = Dims {
        batch: q.len() / (heads * hd).max(1),
        heads,
        kv_heads,
        seq: cache_len,
        head_dim: hd,
    };
    let scale = d.scale::<T>();
    let mut out = vec![T::zero(); q.len()];
    let Ok(pos) = usize::try_from(pos) else {
        return vec![T::nan(); q.len()];
    };
    let rows = pos.min(cache_len.saturating_sub(1)) + 1;
    for (qh, o) in out.chunks_mut(hd.max(1)).enumerate() {
        let qr = &q[qh * hd..(qh + 1) * hd];
        let (kh, vh) = (d.kv_of(k, qh), d.kv_of(v, qh));
        let s: Vec<T> = (0..rows)
            .map(|j| {
                let kj = &kh[j * hd..(j + 1) * hd];
                qr.iter().zip(kj).fold(T::zero(), |a, (&x, &y)| a + x * y) * scale
            })
            .collect();
        let m = s
            .iter()
            .fold(T::neg_infinity(), |a, &x| BinaryOp::Max.apply(a, x));
        let e: Vec<T> = s.iter().map(|&x| (x - m).exp()).collect();
        let sum = e.iter().fold(T::zero(), |a, &x| a + x);
        for (j, &ej) in e.iter().enumerate() {
            let p = ej / sum;
            for (od, &vd) in o.iter_mut().zip(&vh[j * hd..(j + 1) * hd]) {
                *od = *od + p * vd;
            }
        }
    }
    out
}

/// The gradient of `Σ do ∘ o` (`o` the forward's value) with respect to
/// `wrt`: with `dS` as in `score_grads`, `dq = dS k`, `dk = dSᵀ q`, `dv =
/// Pᵀ do`, key and value heads summed over the query heads of their group.
pub fn grad<T: Gemm + Element>(
    d: &Dims,
    wrt: AttentionOperand,
    [q, k, v, o, d_o]: [&[T]; 5],
) -> Vec<T> {
    let (t, hd, hl) = (d.seq, d.head_dim, d.head_len().max(1));
    let work = d.batch * d.heads * t * t * hd;
    let par = work > 1 << 15;
    if wrt == AttentionOperand::Q {
        let mut dq = vec![T::zero(); d.batch * d.heads * d.head_len()];
        for_chunks(&mut dq, d.head_len(), par, |start, part| {
            for (n, out) in part.chunks_mut(hl).enumerate() {
                let qh = start / hl + n;
                let (kh, vh) = (d.kv_of(k, qh), d.kv_of(v, qh));
                let p = probs(d, d.q_head(q, qh), kh);
                let ds = score_grads(d, &p, vh, d.q_head(o, qh), d.q_head(d_o, qh));
                out.copy_from_slice(&matmul_t(&ds, false, kh, false, 1, t, t, hd));
            }
        });
        return dq;
    }
    // One task per key/value head, over the query heads of its group.
    let mut out = vec![T::zero(); d.batch * d.kv_heads * d.head_len()];
    for_chunks(&mut out, d.head_len(), par, |start, part| {
        for (n, acc) in part.chunks_mut(hl).enumerate() {
            let kvh = start / hl + n;
            let (b, kv) = (kvh / d.kv_heads, kvh % d.kv_heads);
            for qh in (0..d.group()).map(|g| b * d.heads + kv * d.group() + g) {
                let (qq, kh) = (d.q_head(q, qh), d.kv_of(k, qh));
                let p = probs(d, qq, kh);
                let add = match wrt {
                    AttentionOperand::V => {
                        matmul_t(&p, true, d.q_head(d_o, qh), false, 1, t, t, hd)
                    }
                    _ => {
                        let (vh, oh) = (d.kv_of(v, qh), d.q_head(o, qh));
                        let ds = score_grads(d, &p, vh, oh, d.q_head(d_o, qh));
                        matmul_t(&ds, true, qq, false, 1, t, t, hd)
                    }
                };
                for (a, x) in acc.iter_mut().zip(add) {
                    *a = *a + x;
                }
            }
        }
    });
    out
}

/// The gradients of [`grad`] for every operand in `wanted` (q, k, v) at
/// once: each head's probabilities and score gradients are computed once
/// and shared by the three, where [`grad`] recomputes them per operand.
/// Each gradient is the value [`grad`] gives, bit for bit (the same
/// operations in the same order); the ones not wanted are `None`.
pub fn grads<T: Gemm + Element>(
    d: &Dims,
    wanted: [bool; 3],
    [q, k, v, o, d_o]: [&[T]; 5],
) -> [Option<Vec<T>>; 3] {
    let (t, hd, hl) = (d.seq, d.head_dim, d.head_len().max(1));
    let group = d.group().max(1);
    let kv_rows = d.batch * d.kv_heads;
    let work = d.batch * d.heads * t * t * hd;
    let [want_q, want_k, want_v] = wanted;
    let mut dq = vec![
        T::zero();
        if want_q {
            d.batch * d.heads * d.head_len()
        } else {
            0
        }
    ];
    let mut dk = vec![T::zero(); if want_k { kv_rows * d.head_len() } else { 0 }];
    let mut dv = vec![T::zero(); if want_v { kv_rows * d.head_len() } else { 0 }];
    // One task per key/value head: its query heads are the contiguous
    // heads kvh·group … kvh·group + group − 1.
    let one = |kvh: usize, dq: &mut [T], dk: &mut [T], dv: &mut [T]| {
        let (b, kv) = (kvh / d.kv_heads, kvh % d.kv_heads);
        for (g, qh) in (0..group).map(|g| (g, b * d.heads + kv * group + g)) {
            let (qq, kh) = (d.q_head(q, qh), d.kv_of(k, qh));
            let p = probs(d, qq, kh);
            if want_v {
                let add = matmul_t(&p, true, d.q_head(d_o, qh), false, 1, t, t, hd);
                for (a, x) in dv.iter_mut().zip(add) {
                    *a = *a + x;
                }
            }
            if want_q || want_k {
                let (vh, oh) = (d.kv_of(v, qh), d.q_head(o, qh));
                let ds = score_grads(d, &p, vh, oh, d.q_head(d_o, qh));
                if want_q {
                    let x = matmul_t(&ds, false, kh, false, 1, t, t, hd);
                    dq[g * hl..(g + 1) * hl].copy_from_slice(&x);
                }
                if want_k {
                    let add = matmul_t(&ds, true, qq, false, 1, t, t, hd);
                    for (a, x) in dk.iter_mut().zip(add) {
                        *a = *a + x;
                    }
                }
            }
        }
    };
    // Each task's rows of each gradient (empty for one not asked for).
    fn rows<T>(x: &mut [T], n: usize, tasks: usize) -> Vec<&mut [T]> {
        if x.is_empty() {
            (0..tasks).map(|_| &mut [][..]).collect()
        } else {
            x.chunks_mut(n).collect()
        }
    }
    let parts: Vec<_> = rows(&mut dq, group * hl, kv_rows)
        .into_iter()
        .zip(rows(&mut dk, hl, kv_rows))
        .zip(rows(&mut dv, hl, kv_rows))
        .collect();
    if work > 1 << 15 && kv_rows > 1 {
        use rayon::prelude::*;
        parts
            .into_par_iter()
            .enumerate()
            .for_each(|(kvh, ((a, b), c))| one(kvh, a, b, c));
    } else {
        for (kvh, ((a, b), c)) in parts.into_iter().enumerate() {
            one(kvh, a, b, c);
        }
    }
    [
        want_q.then_some(dq),
        want_k.then_some(dk),
        want_v.then_some(dv),
    ]
}

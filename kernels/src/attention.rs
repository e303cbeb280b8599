//! Causal softmax attention as hand-written kernels that never store the
//! `[T, T]` probabilities: forward `o = softmax(q kᵀ · scale + causal) v`
//! with its per-row log-sum-exp, and the backward pass, which recomputes
//! the probabilities from that log-sum-exp (the flash-attention recurrence,
//! tiled). Grouped-query attention: query head `h` of `H` reads key/value
//! head `h / (H / H_kv)`.
//!
//! Layouts (row-major): `q, o, do, dq` are `[B, H, T, hd]`; `k, v, dk, dv`
//! are `[B, H_kv, T, hd]`; `lse` and `delta` are `[B, H, T]`; `hd ≤
//! ATTENTION_BLOCK`. Every cube has `TILE_Q × TILE_K` (16 × 8) units and
//! stages `[rows, hd]` tiles of its operands in shared memory (≤ 26 KB),
//! so a key/value row is read from memory once per 16 query rows (and a
//! query row once per 8 keys in the `dk, dv` kernel).
//!
//! - forward: one cube per 16 query rows of a head; per tile of 8 keys
//!   `j ≤ i`, each unit scores one (row, key) pair, the row's running max
//!   and sum are rescaled (online softmax), and each unit accumulates its
//!   row's output columns `x, x + 8, …` in registers. Scores are computed
//!   once.
//! - backward `dq` (also writes `delta_i = do_i · o_i`): the same cubes;
//!   per key tile `ds_ij = p_ij (do_i · v_j − delta_i)`, `dq_i = scale
//!   Σ_j ds_ij k_j`.
//! - backward `dk, dv`: one cube per 8 keys of a key/value head, over the
//!   query tiles with rows `i ≥ j` of every query head of its group:
//!   `dv_j = Σ_i p_ij do_i`, `dk_j = scale Σ_i ds_ij q_i`.
//!
//! Dot products of a (row, key) pair are serial per unit over `hd`, read
//! from shared memory; memory is O(B·H·T) beyond the operands.
//! The device executor runs the IR's `causal_attention` op (and a matched
//! attention subgraph whose scores have no other reader) with the forward
//! kernel (`Kernel::Attention`), and each `causal_attention_grad` op with
//! the forward without its output (for the log-sum-exp) and the backward
//! kernels.

use crate::device::{arg, cubes, Device, DeviceError};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The largest head dimension the kernels take (the row length of their
/// shared-memory tiles).
pub const ATTENTION_BLOCK: usize = 128;

// The fusion pass only puts attention in graphs with head dims it takes.
const _: () = assert!(coopc_ir::kernel::MAX_ATTENTION_HEAD_DIM <= ATTENTION_BLOCK);

/// Query rows per tile.
pub const TILE_Q: usize = 16;
/// Key rows per tile.
pub const TILE_K: usize = 8;
/// Row stride of a staged `[rows, hd]` tile: one word of padding, so the
/// units of a warp reading one column of different rows hit different
/// banks.
const ROW: usize = ATTENTION_BLOCK + 1;
/// Row stride of a `[TILE_Q, TILE_K]` tile of scores.
const SROW: usize = TILE_K + 1;
/// Units per cube: one per (query row, key) of a tile pair.
const UNITS: usize = TILE_Q * TILE_K;

/// Copies rows `r0..r0 + rows` of the `[t, hd]` matrix at `base` into
/// `tile` (stride [`ROW`]), zeros for rows at or past `t`; the cube's
/// units share the elements.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage(
    x: &Array<f32>,
    base: usize,
    r0: usize,
    t: usize,
    hd: usize,
    tile: &mut SharedMemory<f32>,
    tid: usize,
    #[comptime] rows: usize,
) {
    let mut e = tid;
    while e < rows * hd {
        let (r, d) = (e / hd, e % hd);
        let inside = r0 + r < t;
        let v = x[select(inside, base + (r0 + r) * hd + d, base)];
        tile[r * ROW + d] = select(inside, v, f32::new(0.0));
        e += UNITS;
    }
}

/// `Σ_d a[ra, d] · b[rb, d]` of two staged tiles.
#[cube]
fn tile_dot(
    a: &SharedMemory<f32>,
    ra: usize,
    b: &SharedMemory<f32>,
    rb: usize,
    hd: usize,
    zero: f32,
) -> f32 {
    let mut z = zero;
    let mut d = hd * 0usize;
    while d < hd {
        z += a[ra * ROW + d] * b[rb * ROW + d];
        d += 1usize;
    }
    z
}

/// The first element of the key/value matrix `[t, hd]` that query head
/// `bh` (over `[B, H]`) reads: kv head `h / (H / H_kv)` of its batch row.
#[cube]
fn kv_base(bh: usize, t: usize, hd: usize, heads: usize, kv_heads: usize) -> usize {
    let kv_row = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
    kv_row * t * hd
}

/// The head (over `[B, H]` or `[B, H_kv]`) and first row of this cube's
/// tile of `tile` rows, cubes numbered head-major over `⌈t / tile⌉` tiles.
#[cube]
fn tile_origin(t: usize, #[comptime] tile: usize) -> (usize, usize) {
    let blocks = t.div_ceil(tile);
    (CUBE_POS / blocks, (CUBE_POS % blocks) * tile)
}

/// Large negative stand-in for −∞ (WGSL has no infinite literal).
const NEG: f32 = -3.0e38;

/// Launch with `CubeDim(TILE_K, TILE_Q)` and one cube per `TILE_Q` query
/// rows of a head (`B·H·⌈T / TILE_Q⌉` cubes). Unit `(x, y)` scores query
/// row `y` of the tile against key `x` of each key tile, and accumulates
/// output columns `x, x + TILE_K, …` of row `y`.
/// Without `with_output` it writes only `lse` (`o` is not touched, `v`
/// not read): what the backward kernels need from a forward.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &Array<f32>,
    k: &Array<f32>,
    v: &Array<f32>,
    o: &mut Array<f32>,
    lse: &mut Array<f32>,
    n_heads_total: u32,
    t: u32,
    hd: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
    #[comptime] with_output: bool,
) {
    let (t, hd) = (t as usize, hd as usize);
    let (bh, i0) = tile_origin(t, TILE_Q);
    // A whole cube takes the same branch, so its barriers stay uniform.
    if bh >= n_heads_total as usize {
        terminate!();
    }
    let (x, y) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = UNIT_POS as usize;
    let q0 = bh * t * hd;
    let kv0 = kv_base(bh, t, hd, n_heads as usize, n_kv_heads as usize);
    let mut sq = SharedMemory::<f32>::new(TILE_Q * ROW);
    let mut sk = SharedMemory::<f32>::new(TILE_K * ROW);
    let mut sv = SharedMemory::<f32>::new(TILE_K * ROW);
    let mut sp = SharedMemory::<f32>::new(TILE_Q * SROW);
    // Run-time constants (mutable variables must start from run-time values).
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut acc = Array::<f32>::new(ATTENTION_BLOCK / TILE_K);
    #[unroll]
    for u in 0..ATTENTION_BLOCK / TILE_K {
        acc[u] = zero;
    }
    stage(q, q0, i0, t, hd, &mut sq, tid, TILE_Q);
    let i = i0 + y;
    let mut m = zero + NEG;
    let mut l = zero;
    let last = select(i0 + TILE_Q < t, i0 + TILE_Q, t);
    let mut j0 = tid * 0usize;
    while j0 < last {
        stage(k, kv0, j0, t, hd, &mut sk, tid, TILE_K);
        if with_output {
            stage(v, kv0, j0, t, hd, &mut sv, tid, TILE_K);
        }
        sync_cube();
        let j = j0 + x;
        let z = tile_dot(&sq, y, &sk, x, hd, zero) * scale;
        sp[y * SROW + x] = select(j <= i && i < t, z, zero + NEG);
        sync_cube();
        let mut mb = zero + NEG;
        #[unroll]
        for c in 0..TILE_K {
            mb = max(mb, sp[y * SROW + c]);
        }
        let mn = max(m, mb);
        let pr = (sp[y * SROW + x] - mn).exp();
        sync_cube();
        sp[y * SROW + x] = pr;
        sync_cube();
        let alpha = (m - mn).exp();
        let mut rs = zero;
        #[unroll]
        for c in 0..TILE_K {
            rs += sp[y * SROW + c];
        }
        l = l * alpha + rs;
        m = mn;
        if with_output {
            #[unroll]
            for u in 0..ATTENTION_BLOCK / TILE_K {
                let d = x + u * TILE_K;
                if d < hd {
                    let mut a = acc[u] * alpha;
                    #[unroll]
                    for c in 0..TILE_K {
                        a += sp[y * SROW + c] * sv[c * ROW + d];
                    }
                    acc[u] = a;
                }
            }
        }
        sync_cube();
        j0 += TILE_K;
    }
    if i < t {
        if with_output {
            #[unroll]
            for u in 0..ATTENTION_BLOCK / TILE_K {
                let d = x + u * TILE_K;
                if d < hd {
                    o[q0 + i * hd + d] = acc[u] / l;
                }
            }
        }
        if x == 0usize {
            lse[bh * t + i] = m + l.ln();
        }
    }
}

/// `dq` and `delta = rowsum(do ∘ o)`, with the cubes and units of
/// [`attention_forward`]: `ds_ij = p_ij (do_i · v_j − delta_i)`, `dq_i =
/// scale Σ_j ds_ij k_j`, the probabilities recomputed from `lse`.
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
    n_heads_total: u32,
    t: u32,
    hd: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
) {
    let (t, hd) = (t as usize, hd as usize);
    let (bh, i0) = tile_origin(t, TILE_Q);
    if bh >= n_heads_total as usize {
        terminate!();
    }
    let (x, y) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = UNIT_POS as usize;
    let q0 = bh * t * hd;
    let kv0 = kv_base(bh, t, hd, n_heads as usize, n_kv_heads as usize);
    let mut sq = SharedMemory::<f32>::new(TILE_Q * ROW);
    let mut sdo = SharedMemory::<f32>::new(TILE_Q * ROW);
    let mut sk = SharedMemory::<f32>::new(TILE_K * ROW);
    let mut sv = SharedMemory::<f32>::new(TILE_K * ROW);
    let mut sds = SharedMemory::<f32>::new(TILE_Q * SROW);
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut acc = Array::<f32>::new(ATTENTION_BLOCK / TILE_K);
    #[unroll]
    for u in 0..ATTENTION_BLOCK / TILE_K {
        acc[u] = zero;
    }
    stage(q, q0, i0, t, hd, &mut sq, tid, TILE_Q);
    stage(d_o, q0, i0, t, hd, &mut sdo, tid, TILE_Q);
    let i = i0 + y;
    let ic = select(i < t, i, 0usize);
    let row = bh * t + ic;
    // delta_i: each unit sums its columns of do_i ∘ o_i, the row's units
    // add their parts in shared memory.
    let mut part = zero;
    let mut d0 = x;
    while d0 < hd {
        part += d_o[q0 + ic * hd + d0] * o[q0 + ic * hd + d0];
        d0 += TILE_K;
    }
    sds[y * SROW + x] = part;
    sync_cube();
    let mut dd = zero;
    #[unroll]
    for c in 0..TILE_K {
        dd += sds[y * SROW + c];
    }
    let l = lse[row];
    sync_cube();
    let last = select(i0 + TILE_Q < t, i0 + TILE_Q, t);
    let mut j0 = tid * 0usize;
    while j0 < last {
        stage(k, kv0, j0, t, hd, &mut sk, tid, TILE_K);
        stage(v, kv0, j0, t, hd, &mut sv, tid, TILE_K);
        sync_cube();
        let j = j0 + x;
        let mut ds = zero;
        if j <= i && i < t {
            let pr = (tile_dot(&sq, y, &sk, x, hd, zero) * scale - l).exp();
            ds = pr * (tile_dot(&sdo, y, &sv, x, hd, zero) - dd);
        }
        sds[y * SROW + x] = ds;
        sync_cube();
        #[unroll]
        for u in 0..ATTENTION_BLOCK / TILE_K {
            let d = x + u * TILE_K;
            if d < hd {
                let mut a = acc[u];
                #[unroll]
                for c in 0..TILE_K {
                    a += sds[y * SROW + c] * sk[c * ROW + d];
                }
                acc[u] = a;
            }
        }
        sync_cube();
        j0 += TILE_K;
    }
    if i < t {
        #[unroll]
        for u in 0..ATTENTION_BLOCK / TILE_K {
            let d = x + u * TILE_K;
            if d < hd {
                dq[q0 + i * hd + d] = acc[u] * scale;
            }
        }
        if x == 0usize {
            delta[row] = dd;
        }
    }
}

/// `dk`, `dv`, after [`attention_backward_q`] wrote `delta`: one cube per
/// `TILE_K` keys of a key/value head (`B·H_kv·⌈T / TILE_K⌉` cubes), over
/// the query tiles that can see them in every query head of its group.
/// Unit `(x, y)` scores query `y` of a tile against key `x`; then unit
/// `tid` accumulates columns `tid % TILE_Q + TILE_Q u` of key `tid /
/// TILE_Q`: `dv_j = Σ_i p_ij do_i`, `dk_j = scale Σ_i ds_ij q_i`.
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
    n_kv_heads_total: u32,
    t: u32,
    hd: u32,
    n_heads: u32,
    n_kv_heads: u32,
    scale: f32,
) {
    let (t, hd) = (t as usize, hd as usize);
    let (heads, kv_heads) = (n_heads as usize, n_kv_heads as usize);
    let group = heads / kv_heads;
    let (bkv, j0) = tile_origin(t, TILE_K);
    if bkv >= n_kv_heads_total as usize {
        terminate!();
    }
    let (x, y) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = UNIT_POS as usize;
    let (kc, kx) = (tid / TILE_Q, tid % TILE_Q);
    let k0 = bkv * t * hd;
    let mut sk = SharedMemory::<f32>::new(TILE_K * ROW);
    let mut sv = SharedMemory::<f32>::new(TILE_K * ROW);
    let mut sq = SharedMemory::<f32>::new(TILE_Q * ROW);
    let mut sdo = SharedMemory::<f32>::new(TILE_Q * ROW);
    let mut sp = SharedMemory::<f32>::new(TILE_Q * SROW);
    let mut sds = SharedMemory::<f32>::new(TILE_Q * SROW);
    let zero = f32::cast_from(UNIT_POS) * f32::new(0.0);
    let mut acc_k = Array::<f32>::new(ATTENTION_BLOCK / TILE_Q);
    let mut acc_v = Array::<f32>::new(ATTENTION_BLOCK / TILE_Q);
    #[unroll]
    for u in 0..ATTENTION_BLOCK / TILE_Q {
        acc_k[u] = zero;
        acc_v[u] = zero;
    }
    stage(k, k0, j0, t, hd, &mut sk, tid, TILE_K);
    stage(v, k0, j0, t, hd, &mut sv, tid, TILE_K);
    let j = j0 + x;
    let mut g = tid * 0usize;
    while g < group {
        // Query head of this kv head's group, in the same batch row.
        let bh = (bkv / kv_heads) * heads + (bkv % kv_heads) * group + g;
        let q0 = bh * t * hd;
        // The first query tile holding a row i ≥ j0.
        let mut i0 = (j0 / TILE_Q) * TILE_Q;
        while i0 < t {
            stage(q, q0, i0, t, hd, &mut sq, tid, TILE_Q);
            stage(d_o, q0, i0, t, hd, &mut sdo, tid, TILE_Q);
            sync_cube();
            let i = i0 + y;
            let mut pr = zero;
            let mut ds = zero;
            if j <= i && i < t {
                let row = bh * t + i;
                pr = (tile_dot(&sq, y, &sk, x, hd, zero) * scale - lse[row]).exp();
                ds = pr * (tile_dot(&sdo, y, &sv, x, hd, zero) - delta[row]);
            }
            sp[y * SROW + x] = pr;
            sds[y * SROW + x] = ds;
            sync_cube();
            #[unroll]
            for u in 0..ATTENTION_BLOCK / TILE_Q {
                let d = kx + u * TILE_Q;
                if d < hd {
                    let mut av = acc_v[u];
                    let mut ak = acc_k[u];
                    #[unroll]
                    for r in 0..TILE_Q {
                        av += sp[r * SROW + kc] * sdo[r * ROW + d];
                        ak += sds[r * SROW + kc] * sq[r * ROW + d];
                    }
                    acc_v[u] = av;
                    acc_k[u] = ak;
                }
            }
            sync_cube();
            i0 += TILE_Q;
        }
        g += 1usize;
    }
    if j0 + kc < t {
        let at = k0 + (j0 + kc) * hd;
        #[unroll]
        for u in 0..ATTENTION_BLOCK / TILE_Q {
            let d = kx + u * TILE_Q;
            if d < hd {
                dk[at + d] = acc_k[u] * scale;
                dv[at + d] = acc_v[u];
            }
        }
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
    /// Launches [`attention_forward`] on device buffers: `(o, lse)`,
    /// without waiting.
    pub fn launch_attention(
        &self,
        [q, k, v]: [&Handle; 3],
        s: AttentionShape,
    ) -> Result<(Handle, Handle), DeviceError> {
        s.check("attention", &[])?;
        let (ql, rows) = (s.q_len(), s.rows());
        let (o, lse) = (self.output(ql), self.output(rows));
        self.launch_attention_forward([q, k, v], [(&o, ql), (&lse, rows)], s, true);
        Ok((o, lse))
    }

    /// Launches [`attention_forward`] for the per-row log-sum-exp alone
    /// (what the backward kernels need): `lse`.
    pub(crate) fn launch_attention_lse(
        &self,
        [q, k, v]: [&Handle; 3],
        s: AttentionShape,
    ) -> Result<Handle, DeviceError> {
        s.check("attention", &[])?;
        let (lse, unused) = (self.output(s.rows()), self.output(1));
        self.launch_attention_forward([q, k, v], [(&unused, 1), (&lse, s.rows())], s, false);
        Ok(lse)
    }

    fn launch_attention_forward(
        &self,
        [q, k, v]: [&Handle; 3],
        [(o, o_len), (lse, rows)]: [(&Handle, usize); 2],
        s: AttentionShape,
        with_output: bool,
    ) {
        let (ql, kl) = (s.q_len(), s.kv_len());
        let heads = s.batch * s.heads;
        attention_forward::launch::<R>(
            self.client(),
            cubes(heads * s.seq.div_ceil(TILE_Q)),
            CubeDim::new_2d(TILE_K as u32, TILE_Q as u32),
            arg(q, ql),
            arg(k, kl),
            arg(v, kl),
            arg(o, o_len),
            arg(lse, rows),
            heads as u32,
            s.seq as u32,
            s.head_dim as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.scale(),
            with_output,
        );
    }

    /// Launches [`attention_backward_q`] then, when `kv`, also
    /// [`attention_backward_kv`]: `(dq, Some((dk, dv)))`, without waiting.
    pub fn launch_attention_backward(
        &self,
        [q, k, v, o, lse, d_o]: [&Handle; 6],
        s: AttentionShape,
        kv: bool,
    ) -> Result<(Handle, Option<(Handle, Handle)>), DeviceError> {
        s.check("attention_backward", &[])?;
        let (ql, kl, rows) = (s.q_len(), s.kv_len(), s.rows());
        let (dq, delta) = (self.output(ql), self.output(rows));
        let heads = s.batch * s.heads;
        attention_backward_q::launch::<R>(
            self.client(),
            cubes(heads * s.seq.div_ceil(TILE_Q)),
            CubeDim::new_2d(TILE_K as u32, TILE_Q as u32),
            arg(q, ql),
            arg(k, kl),
            arg(v, kl),
            arg(o, ql),
            arg(d_o, ql),
            arg(lse, rows),
            arg(&dq, ql),
            arg(&delta, rows),
            heads as u32,
            s.seq as u32,
            s.head_dim as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.scale(),
        );
        if !kv {
            return Ok((dq, None));
        }
        let (dk, dv) = (self.output(kl), self.output(kl));
        let kv_heads = s.batch * s.kv_heads;
        attention_backward_kv::launch::<R>(
            self.client(),
            cubes(kv_heads * s.seq.div_ceil(TILE_K)),
            CubeDim::new_2d(TILE_K as u32, TILE_Q as u32),
            arg(q, ql),
            arg(k, kl),
            arg(v, kl),
            arg(d_o, ql),
            arg(lse, rows),
            arg(&delta, rows),
            arg(&dk, kl),
            arg(&dv, kl),
            kv_heads as u32,
            s.seq as u32,
            s.head_dim as u32,
            s.heads as u32,
            s.kv_heads as u32,
            s.scale(),
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

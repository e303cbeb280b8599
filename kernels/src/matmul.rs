//! Batched matrix product `[B, m, k] × [B, k, n] → [B, m, n]`, tiled through
//! shared memory. An operand can be read transposed (`a` stored `[B, k,
//! m]`, `b` stored `[B, n, k]`), so a transpose that only feeds matrix
//! products is never written out.
//!
//! - [`matmul_blocked`] (both `m` and `n` at least [`BLOCK_MN`]): each cube
//!   computes a `64 × 64` block with `16 × 16` units, each unit a `4 × 4`
//!   register tile (rows `ty + 16 i`, columns `tx + 16 j`), staging
//!   `64 × 16` panels of both operands in shared memory: 16 products per 8
//!   shared-memory reads, where one logit per unit does one per two. Where
//!   both are at least 128 ([`Product::Wide`]), a `128 × 128` block with an
//!   `8 × 8` tile per unit: 64 products per 16 reads (128 registers a
//!   thread on sm_90, no spills).
//! - [`matmul_tiled`] (the thin products: LoRA's rank-r factors, a single
//!   row): each cube a `TILE × TILE` block, one output per unit.

use crate::device::{arg, Device, DeviceError};
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::sync::atomic::Ordering;

pub const TILE: usize = 16;

/// `a[at]` when `inside`, else 0 (`at` is not read then).
#[cube]
pub(crate) fn load_or_zero(a: &Array<f32>, at: usize, inside: bool) -> f32 {
    let v = a[select(inside, at, 0usize)];
    select(inside, v, f32::new(0.0))
}

/// Launch with `CubeDim(TILE, TILE)` and
/// `CubeCount(ceil(n / TILE), ceil(m / TILE), B)`. The operands and the
/// result start at elements `a_off`, `b_off`, `out_off` of their buffers; with
/// `accumulate` the product is added to `out` instead of stored.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_tiled(
    a: &Array<f32>,
    b: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    k: u32,
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
    #[comptime] tile: usize,
    #[comptime] trans_a: bool,
    #[comptime] trans_b: bool,
    #[comptime] accumulate: bool,
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
    let a_base = a_off as usize + batch * m * k;
    let b_base = b_off as usize + batch * k * n;
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
        let at = out_off as usize + batch * m * n + row * n + col;
        if accumulate {
            out[at] += acc;
        } else {
            out[at] = acc;
        }
    }
}

/// Rows and columns of a [`matmul_blocked`] cube's block.
pub const BLOCK_MN: usize = 64;
/// Depth of the panels it stages per step.
pub const BLOCK_K: usize = 16;
/// Outputs per unit along each axis (`BLOCK_MN / 16`).
pub(crate) const REG: usize = 4;
/// Outputs per unit along each axis of the wide blocks (128 × 128).
pub(crate) const WIDE_REG: usize = 8;

/// The `reg × reg` register tile of this unit (rows `row0 + ty + 16 i`,
/// columns `col0 + tx + 16 j`, at `acc[reg i + j]`) of the product of `a`
/// (`[m, k]`, or stored `[k, m]` with `trans_a`, from `a_base`) and `b`
/// (`[k, n]`, or stored `[n, k]` with `trans_b`, from `b_base`), through
/// 16-deep shared-memory panels. A cube of `16 × 16` units computes the
/// `16 reg × 16 reg` block at `(row0, col0)` (`reg` = [`REG`], 64 × 64,
/// or [`WIDE_REG`], 128 × 128); every unit must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn blocked_product(
    a: &Array<f32>,
    a_base: usize,
    b: &Array<f32>,
    b_base: usize,
    m: usize,
    k: usize,
    n: usize,
    row0: usize,
    col0: usize,
    acc: &mut Array<f32>,
    #[comptime] trans_a: bool,
    #[comptime] trans_b: bool,
    #[comptime] reg: usize,
) {
    let block = 16 * reg;
    let panel = block + 1;
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let tid = ty * 16 + tx;
    // Panels [BLOCK_K][16 reg + 1]: sa[q][r] = a[row0 + r, k0 + q], sb[q][c] =
    // b[k0 + q, col0 + c].
    let mut sa = SharedMemory::<f32>::new(BLOCK_K * (16 * reg + 1));
    let mut sb = SharedMemory::<f32>::new(BLOCK_K * (16 * reg + 1));
    let zero = f32::cast_from(UNIT_POS_X) * f32::new(0.0);
    #[unroll]
    for i in 0..reg * reg {
        acc[i] = zero;
    }
    let mut af = Array::<f32>::new(reg);
    let mut bf = Array::<f32>::new(reg);
    let mut k0 = (UNIT_POS_X * 0) as usize;
    while k0 < k {
        // Each unit stages `reg` of a panel's `256 reg` elements, consecutive
        // units reading consecutive addresses of the operand.
        #[unroll]
        for p in 0..reg {
            let e = tid + p * 256;
            let (r, q) = if trans_a {
                (e % block, e / block)
            } else {
                (e / BLOCK_K, e % BLOCK_K)
            };
            let (gr, gq) = (row0 + r, k0 + q);
            let at = if trans_a {
                a_base + gq * m + gr
            } else {
                a_base + gr * k + gq
            };
            sa[q * panel + r] = load_or_zero(a, at, gr < m && gq < k);
            let (c, q2) = if trans_b {
                (e / BLOCK_K, e % BLOCK_K)
            } else {
                (e % block, e / block)
            };
            let (gc, gq2) = (col0 + c, k0 + q2);
            let bt = if trans_b {
                b_base + gc * k + gq2
            } else {
                b_base + gq2 * n + gc
            };
            sb[q2 * panel + c] = load_or_zero(b, bt, gq2 < k && gc < n);
        }
        sync_cube();
        #[unroll]
        for q in 0..BLOCK_K {
            #[unroll]
            for i in 0..reg {
                af[i] = sa[q * panel + ty + 16 * i];
                bf[i] = sb[q * panel + tx + 16 * i];
            }
            #[unroll]
            for i in 0..reg {
                #[unroll]
                for j in 0..reg {
                    acc[i * reg + j] += af[i] * bf[j];
                }
            }
        }
        sync_cube();
        k0 += BLOCK_K;
    }
}

/// Whether an `m × n` product runs [`matmul_blocked`] (else
/// [`matmul_tiled`]).
pub fn use_blocked(m: usize, n: usize) -> bool {
    m >= BLOCK_MN && n >= BLOCK_MN
}

/// Which of coopc's product kernels computes an `m × n` product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Product {
    /// [`matmul_tiled`]: one output per unit (thin products).
    Tiled,
    /// [`matmul_blocked`] with 64 × 64 blocks, 4 × 4 outputs per unit.
    Blocked,
    /// [`matmul_blocked`] with 128 × 128 blocks, 8 × 8 outputs per unit:
    /// 64 products per 16 shared-memory reads instead of 16 per 8, for
    /// products with both output sides of at least 128.
    Wide,
}

impl Product {
    /// The kernel for an `m × n` product.
    pub fn for_shape(m: usize, n: usize) -> Product {
        if m >= 16 * WIDE_REG && n >= 16 * WIDE_REG {
            Product::Wide
        } else if use_blocked(m, n) {
            Product::Blocked
        } else {
            Product::Tiled
        }
    }

    /// Outputs per unit along each axis of a blocked kernel.
    pub fn reg(self) -> usize {
        match self {
            Product::Wide => WIDE_REG,
            _ => REG,
        }
    }

    /// The kernel's name in emitted sources.
    pub fn name(self) -> &'static str {
        match self {
            Product::Tiled => "matmul",
            Product::Blocked => "matmul_blocked",
            Product::Wide => "matmul_wide",
        }
    }
}

/// Launch with `CubeDim(16, 16)` and
/// `CubeCount(ceil(n / (16 reg)), ceil(m / (16 reg)), B)`; `reg` is
/// [`REG`] or [`WIDE_REG`]; offsets and `accumulate` as for
/// [`matmul_tiled`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_blocked(
    a: &Array<f32>,
    b: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    k: u32,
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
    #[comptime] trans_a: bool,
    #[comptime] trans_b: bool,
    #[comptime] accumulate: bool,
    #[comptime] reg: usize,
) {
    let (m, k, n) = (m as usize, k as usize, n as usize);
    let batch = CUBE_POS_Z as usize;
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let row0 = CUBE_POS_Y as usize * (16 * reg);
    let col0 = CUBE_POS_X as usize * (16 * reg);
    let a_base = a_off as usize + batch * m * k;
    let b_base = b_off as usize + batch * k * n;
    let mut acc = Array::<f32>::new(reg * reg);
    blocked_product(
        a, a_base, b, b_base, m, k, n, row0, col0, &mut acc, trans_a, trans_b, reg,
    );
    #[unroll]
    for i in 0..reg {
        #[unroll]
        for j in 0..reg {
            let (r, c) = (row0 + ty + 16 * i, col0 + tx + 16 * j);
            if r < m && c < n {
                let at = out_off as usize + batch * m * n + r * n + c;
                if accumulate {
                    out[at] += acc[i * reg + j];
                } else {
                    out[at] = acc[i * reg + j];
                }
            }
        }
    }
}

/// `out[out_off + i] += x[i]` for `i < len`. Launch with one unit per
/// element ([`crate::device::cubes`] of 256-unit cubes).
#[cube(launch)]
pub fn add_into(out: &mut Array<f32>, x: &Array<f32>, out_off: u32, len: u32) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        out[out_off as usize + i] += x[i];
    }
}

/// A batched product's sizes: `batch` products of `[m, k] × [k, n]`, the
/// operands stored transposed where `trans_a` / `trans_b` say.
#[derive(Clone, Copy, Debug)]
pub struct MatmulShape {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulShape {
    /// Elements of `a`, `b` and the product.
    pub fn lens(&self) -> [usize; 3] {
        [
            self.batch * self.m * self.k,
            self.batch * self.k * self.n,
            self.batch * self.m * self.n,
        ]
    }
}

impl<R: Runtime> Device<R> {
    /// Launches the product of the resident operands `a` and `b` with
    /// `kernel` into a new buffer, which it returns without waiting for
    /// the kernel.
    pub fn launch_matmul(&self, a: &Handle, b: &Handle, s: MatmulShape, kernel: Product) -> Handle {
        let lens = s.lens();
        let out = self.output(lens[2]);
        self.launch_matmul_into(
            [(a, lens[0]), (b, lens[1]), (&out, lens[2])],
            s,
            [0; 3],
            false,
            kernel,
        );
        out
    }

    /// Launches the product of `a` and `b` (each a buffer and its length)
    /// into `out`, the three starting at element `offsets` of their
    /// buffers; with `accumulate` it is added to what `out` holds there.
    pub(crate) fn launch_matmul_into(
        &self,
        [(a, a_len), (b, b_len), (out, out_len)]: [(&Handle, usize); 3],
        s: MatmulShape,
        offsets: [usize; 3],
        accumulate: bool,
        kernel: Product,
    ) {
        let u = |v: usize| v as u32;
        let [ao, bo, oo] = offsets.map(u);
        let args = (arg(a, a_len), arg(b, b_len), arg(out, out_len));
        let size = (u(s.m), u(s.k), u(s.n));
        if kernel != Product::Tiled {
            let t = 16 * kernel.reg() as u32;
            matmul_blocked::launch::<R>(
                self.client(),
                CubeCount::Static(u(s.n).div_ceil(t), u(s.m).div_ceil(t), u(s.batch)),
                CubeDim::new_2d(16, 16),
                args.0,
                args.1,
                args.2,
                size.0,
                size.1,
                size.2,
                ao,
                bo,
                oo,
                s.trans_a,
                s.trans_b,
                accumulate,
                kernel.reg(),
            );
        } else {
            let t = TILE as u32;
            matmul_tiled::launch::<R>(
                self.client(),
                CubeCount::Static(u(s.n).div_ceil(t), u(s.m).div_ceil(t), u(s.batch)),
                CubeDim::new_2d(t, t),
                args.0,
                args.1,
                args.2,
                size.0,
                size.1,
                size.2,
                ao,
                bo,
                oo,
                TILE,
                s.trans_a,
                s.trans_b,
                accumulate,
            );
        }
    }

    /// Waits until every launched kernel has finished.
    pub fn wait(&self) -> Result<(), DeviceError> {
        cubecl::future::block_on(self.client().sync())
            .map_err(|e| DeviceError::Device(format!("{e:?}")))
    }
}

/// A routine of CubeCL's matmul (`cubek-matmul`).
pub use cubek_matmul::launch::Strategy as CubeclStrategy;

/// The kernel that runs the schedule's matrix products (`Kernel::MatMul`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// CubeCL's matmul (`cubek-matmul`), its `simple_unit` routine: f32
    /// products on the arithmetic units (no TF32 tensor cores, which round
    /// the operands to 10 mantissa bits).
    Cubecl,
    /// CubeCL's matmul on tensor cores where the device has them (its
    /// `simple_cyclic_cmma` routine: operands rounded to TF32, f32
    /// accumulation; PyTorch's `allow_tf32`), else as [`Self::Cubecl`].
    /// Opt-in: `backend.matmul = "tf32"` or `COOPC_MATMUL=tf32`.
    CubeclTf32,
    /// coopc's own [`matmul_blocked`] / [`matmul_tiled`] kernels.
    Coopc,
}

impl MatmulKernel {
    /// The kernels that compute in f32 (the tests hold them to 1e-4).
    pub const ALL: [MatmulKernel; 2] = [MatmulKernel::Cubecl, MatmulKernel::Coopc];

    /// `COOPC_MATMUL`: `cubecl`, `tf32` or `coopc`; `None` when unset.
    pub fn from_env() -> Result<Option<MatmulKernel>, DeviceError> {
        match std::env::var("COOPC_MATMUL").as_deref() {
            Err(_) => Ok(None),
            Ok("cubecl") => Ok(Some(MatmulKernel::Cubecl)),
            Ok("tf32") => Ok(Some(MatmulKernel::CubeclTf32)),
            Ok("coopc") => Ok(Some(MatmulKernel::Coopc)),
            Ok(other) => Err(DeviceError::Device(format!(
                "COOPC_MATMUL is `{other}`: use `cubecl` (the default), `tf32` or `coopc`"
            ))),
        }
    }

    /// `COOPC_MATMUL` where it is set, else `default`.
    pub fn from_env_or(default: MatmulKernel) -> Result<MatmulKernel, DeviceError> {
        Ok(Self::from_env()?.unwrap_or(default))
    }

    /// Whether products run CubeCL's matmul.
    pub fn is_cubecl(self) -> bool {
        self != MatmulKernel::Coopc
    }

    /// The CubeCL routines this kernel tries, in turn, until one takes the
    /// problem.
    fn routines(self) -> Vec<CubeclStrategy> {
        let unit = CubeclStrategy::SimpleUnit(Default::default());
        match self {
            MatmulKernel::Cubecl => vec![unit],
            MatmulKernel::CubeclTf32 => {
                vec![CubeclStrategy::SimpleCyclicCmma(Default::default()), unit]
            }
            MatmulKernel::Coopc => Vec::new(),
        }
    }

    /// The error relative to `max(|x|, 1)` the start-up check allows on a
    /// product of 70 terms of size ≤ 0.25 (TF32 rounds each operand by up
    /// to 2⁻¹¹).
    fn tolerance(self) -> f32 {
        match self {
            MatmulKernel::CubeclTf32 => 2e-2,
            _ => 1e-4,
        }
    }
}

/// Byte alignment of a buffer offset at which CubeCL's matmul may read or
/// write an operand (wgpu's default `min_storage_buffer_offset_alignment`;
/// CUDA asks less).
const OFFSET_ALIGN: usize = 256;

impl<R: Runtime> Device<R> {
    /// Launches the product of the resident operands `a` and `b` into a new
    /// buffer with the device's [`MatmulKernel`]: CubeCL's matmul, or
    /// coopc's kernels where it refuses the problem (or is not asked for).
    pub fn launch_product(&self, a: &Handle, b: &Handle, s: MatmulShape) -> Handle {
        let [a_len, b_len, len] = s.lens();
        let out = self.output(len);
        self.product_into([(a, a_len), (b, b_len), (&out, len)], s, [0; 3], false);
        out
    }

    /// How many products since the device was made asked for CubeCL's
    /// matmul but ran coopc's kernels: a view at an offset that is not a
    /// multiple of 256 bytes, any view where the start-up check found that
    /// views do not work, or a problem CubeCL's matmul refused.
    pub fn matmul_fallbacks(&self) -> u64 {
        self.matmul_fallbacks.load(Ordering::Relaxed)
    }

    /// Launches the product of `a` and `b` (each a buffer and its length)
    /// into `out`, the three starting at element `offsets` of their
    /// buffers, with the device's [`MatmulKernel`]; with `accumulate` it is
    /// added to what `out` holds there. CubeCL's matmul reads and writes
    /// at offsets through views of the buffers (where an offset is a
    /// multiple of 256 bytes) and accumulates through a temporary and
    /// [`add_into`]; otherwise, or where it refuses the problem, coopc's
    /// kernels run.
    pub(crate) fn product_into(
        &self,
        ops: [(&Handle, usize); 3],
        s: MatmulShape,
        offsets: [usize; 3],
        accumulate: bool,
    ) {
        // A view of each operand, and of the result unless it is added
        // from a temporary.
        let viewed = if accumulate { 2 } else { 3 };
        let aligned = offsets[..viewed]
            .iter()
            .all(|&o| (o * 4) % OFFSET_ALIGN == 0);
        let views = offsets[..viewed].iter().all(|&o| o == 0) || self.matmul_views;
        if self.matmul.is_cubecl() && aligned && views {
            let len = s.lens()[2];
            let done = if accumulate {
                let tmp = self.output(len);
                let ops_tmp = [ops[0], ops[1], (&tmp, len)];
                let run = self.cubecl_views_into(ops_tmp, s, [offsets[0], offsets[1], 0]);
                run.map(|()| {
                    add_into::launch::<R>(
                        self.client(),
                        crate::device::cubes(len.div_ceil(256)),
                        CubeDim::new_1d(256),
                        arg(ops[2].0, ops[2].1),
                        arg(&tmp, len),
                        offsets[2] as u32,
                        len as u32,
                    );
                    self.note_memory();
                })
            } else {
                self.cubecl_views_into(ops, s, offsets)
            };
            if done.is_ok() {
                return;
            }
        }
        if self.matmul.is_cubecl() {
            self.matmul_fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        self.launch_matmul_into(ops, s, offsets, accumulate, Product::for_shape(s.m, s.n));
    }

    /// Tries CubeCL's matmul on this device before any product needs it:
    /// small products against the host's, in the layouts the schedules and
    /// the log-prob use (an odd shape with a transposed operand; 128³ with
    /// each operand transposed or not, which compiles the vectorised,
    /// unchecked variants), then through views at offsets of larger
    /// buffers. Where a product fails or is wrong, TF32 products fall back
    /// to CubeCL's f32 routine and f32 products to coopc's kernels; where
    /// only views fail, products at offsets run coopc's kernels; each with
    /// a warning.
    pub(crate) fn settle_matmul(&mut self) {
        let backend = self.backend();
        while self.matmul.is_cubecl() {
            let Some(why) = self.matmul_failure(false) else {
                break;
            };
            let next = match self.matmul {
                MatmulKernel::CubeclTf32 => MatmulKernel::Cubecl,
                _ => MatmulKernel::Coopc,
            };
            eprintln!(
                "warning: CubeCL's matmul ({:?}) does not work on this {backend} device ({why}); matrix products run {next:?}",
                self.matmul
            );
            self.matmul = next;
        }
        if !self.matmul.is_cubecl() {
            return;
        }
        if let Some(why) = self.matmul_failure(true) {
            eprintln!(
                "warning: CubeCL's matmul does not read or write views of buffers on this {backend} device ({why}); products at offsets run coopc's kernels"
            );
            self.matmul_views = false;
        }
    }

    /// The first of the start-up check's products (see
    /// [`Device::settle_matmul`]) that fails or is wrong with the device's
    /// CubeCL routines, and how; `views` runs them through views.
    fn matmul_failure(&self, views: bool) -> Option<String> {
        let shape = |m, k, n, trans_a, trans_b| MatmulShape {
            batch: 1,
            m,
            k,
            n,
            trans_a,
            trans_b,
        };
        let cases = [
            shape(37, 70, 45, false, true),
            shape(128, 128, 128, false, true),
            shape(128, 128, 128, false, false),
            shape(128, 128, 128, true, false),
        ];
        let tolerance = self.matmul.tolerance();
        cases.into_iter().find_map(|s| {
            let a: Vec<f32> = (0..s.m * s.k)
                .map(|i| (i % 13) as f32 / 13.0 - 0.5)
                .collect();
            let b: Vec<f32> = (0..s.k * s.n).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect();
            // Element (i, l) of a and (l, j) of b in their stored layouts.
            let at = |i: usize, l: usize| a[if s.trans_a { l * s.m + i } else { i * s.k + l }];
            let bt = |l: usize, j: usize| b[if s.trans_b { j * s.k + l } else { l * s.n + j }];
            let want = |i: usize, j: usize| (0..s.k).map(|l| at(i, l) * bt(l, j)).sum::<f32>();
            // With views: b from element 64 of a buffer, the result from
            // element 128 of a buffer of NaN whose other elements must stay
            // NaN.
            let (b_off, o_off) = if views { (64, 128) } else { (0, 0) };
            let run = || -> Result<Vec<f32>, DeviceError> {
                let ah = self.upload(&a);
                let bh = self.upload(&[vec![0.0; b_off], b.clone()].concat());
                let len = o_off + s.m * s.n + if views { 64 } else { 0 };
                let oh = self.upload(&vec![f32::NAN; len]);
                let ops = [(&ah, a.len()), (&bh, b_off + b.len()), (&oh, len)];
                self.cubecl_views_into(ops, s, [0, b_off, o_off])?;
                let all = self.download(oh, len)?;
                let outside = all[..o_off].iter().chain(&all[o_off + s.m * s.n..]);
                if let Some(x) = outside.into_iter().find(|x| !x.is_nan()) {
                    return Err(DeviceError::Device(format!(
                        "a product through a view wrote {x} outside it"
                    )));
                }
                Ok(all[o_off..o_off + s.m * s.n].to_vec())
            };
            let what = format!(
                "{}×{}×{}{}{}",
                s.m,
                s.k,
                s.n,
                if s.trans_a { ", a transposed" } else { "" },
                if s.trans_b { ", b transposed" } else { "" }
            );
            let failure = match crate::device::guarded(DeviceError::Device, run) {
                Ok(Ok(got)) => (0..s.m * s.n).find_map(|p| {
                    let w = want(p / s.n, p % s.n);
                    let err = (got[p] - w).abs();
                    (err.is_nan() || err > tolerance * w.abs().max(1.0))
                        .then(|| format!("element {p} is {}, not {w}", got[p]))
                }),
                Ok(Err(e)) | Err(e) => Some(e.to_string()),
            };
            failure.map(|why| format!("{what}: {why}"))
        })
    }

    /// Launches the product of the resident operands `a` and `b` through
    /// CubeCL's matmul (`cubek-matmul`) with `strategy` into a new buffer;
    /// transposed operands are read through their strides.
    pub fn launch_matmul_cubecl(
        &self,
        a: &Handle,
        b: &Handle,
        s: MatmulShape,
        strategy: &CubeclStrategy,
    ) -> Result<Handle, DeviceError> {
        let out = self.output(s.lens()[2]);
        self.cubecl_product_into([a.clone(), b.clone(), out.clone()], s, strategy)?;
        Ok(out)
    }

    /// Launches the product of `a` and `b` into `out` through CubeCL's
    /// matmul, each read or written through a view of its buffer starting
    /// at element `offsets` (a multiple of 64 elements on wgpu).
    fn cubecl_views_into(
        &self,
        ops: [(&Handle, usize); 3],
        s: MatmulShape,
        offsets: [usize; 3],
    ) -> Result<(), DeviceError> {
        let view = |i: usize| match offsets[i] {
            0 => ops[i].0.clone(),
            o => ops[i].0.clone().offset_start((o * 4) as u64),
        };
        self.cubecl_into([view(0), view(1), view(2)], s)
    }

    /// Launches the product of `a` and `b` into `out` through CubeCL's
    /// matmul with the first of the device's routines that takes it.
    fn cubecl_into(&self, ops: [Handle; 3], s: MatmulShape) -> Result<(), DeviceError> {
        let mut last = DeviceError::Device("no CubeCL routine".into());
        for routine in self.matmul.routines() {
            match self.cubecl_product_into(ops.clone(), s, &routine) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Launches the product of `a` and `b` into `out` (each a buffer, or a
    /// view of one starting at an offset) through CubeCL's matmul with
    /// `strategy`.
    fn cubecl_product_into(
        &self,
        [a, b, out]: [Handle; 3],
        s: MatmulShape,
        strategy: &CubeclStrategy,
    ) -> Result<(), DeviceError> {
        use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
        use cubek_matmul::launch::launch_ref;
        let (m, k, n) = (s.m, s.k, s.n);
        // Logical [batch, rows, cols] with the strides of the stored layout.
        let tensor = |h: Handle, rows: usize, cols: usize, trans: bool| {
            let strides = if trans {
                [rows * cols, 1, rows]
            } else {
                [rows * cols, cols, 1]
            };
            unsafe {
                TensorBinding::<R>::from_raw_parts(
                    h,
                    strides.to_vec().into(),
                    vec![s.batch, rows, cols].into(),
                )
            }
        };
        let f32_type = f32::as_type_native_unchecked().storage_type();
        let input = |t| cubek_std::InputBinding::new(t, f32_type);
        let mut elems = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: f32_type,
            rhs: f32_type,
            out: f32_type,
        });
        launch_ref(
            strategy,
            self.client(),
            input(tensor(a, m, k, s.trans_a)),
            input(tensor(b, k, n, s.trans_b)),
            tensor(out, m, n, false),
            &mut elems,
        )
        .map_err(|e| DeviceError::Device(format!("cubecl matmul: {e:?}")))
    }
}

//! Rotate-half rotary position embedding (`Op::Rope`) as one hand-written
//! kernel: each unit reads its element of `x`, the element half a row away
//! and one entry of each table, and writes one output, so `x` is read once
//! (the ops it replaces — slices, a negation, a concat and the products —
//! were five kernels and three intermediate tensors).
//!
//! `x` and `out` are `[rows, hd]` with row `r` at position `r % t` of the
//! tables `cos, sin [t, hd]`; `h = hd / 2`.
//! - forward: `out = x ∘ cos + [−x[h..], x[..h]] ∘ sin`;
//! - `transpose` (the gradient with respect to `x`): `out = x ∘ cos +
//!   [(x ∘ sin)[h..], −(x ∘ sin)[..h]]`.

use cubecl::prelude::*;

/// One unit per element of `x`, `numel` of them.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    out: &mut Array<f32>,
    numel: u32,
    t: u32,
    hd: u32,
    #[comptime] transpose: bool,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let hd = hd as usize;
        let h = hd / 2;
        let j = i % hd;
        let p = ((i / hd) % t as usize) * hd + j;
        let straight = x[i] * cos[p];
        if j < h {
            if transpose {
                out[i] = straight + x[i + h] * sin[p + h];
            } else {
                out[i] = straight + (-x[i + h]) * sin[p];
            }
        } else if transpose {
            out[i] = straight - x[i - h] * sin[p - h];
        } else {
            out[i] = straight + x[i - h] * sin[p];
        }
    }
}

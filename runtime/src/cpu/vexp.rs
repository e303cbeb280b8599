//! `exp` over f32 slices, sixteen lanes at a time with AVX-512, giving the
//! same bits as the scalar `f32::exp` the executor used before.
//!
//! `f32::exp` is the C library's `expf`. glibc's (since 2.27; the x86-64
//! build picks its FMA variant on any machine with AVX2 and FMA, so on every
//! AVX-512 machine) computes in f64 with a 32-entry table of 2^(i/32) and a
//! cubic, then rounds once to f32:
//!
//! ```text
//! kd = fma(32/ln 2, x, 0x1.8p52)        (k = round(32 x / ln 2) in its low bits)
//! r  = fma(32/ln 2, x, -(kd - 0x1.8p52))
//! s  = bits(T[k mod 32] + (k << 47))    (2^(k/32))
//! y  = fma(fma(r, C0, C1), r·r, fma(r, C2, 1)) · s
//! exp(x) = f32(y)
//! ```
//!
//! for |x| below 88 (and what underflows to subnormals down to −103.3);
//! beyond that, NaN and ±∞, the scalar `expf` is called per lane. Lanes
//! here run exactly that sequence of roundings, so the results are the same
//! bits: an exhaustive test (ignored by default, 18 s) compares all 2^32
//! inputs, CI every 2^8-th bit pattern and a window around every power of
//! two. The table is read by two two-register permutes, not a gather
//! (0.66 ns per element against `f32::exp`'s 2.8 ns on a Zen 4 core). A different C library could compute `expf`
//! otherwise: the first use compares the vector path against `f32::exp` on
//! a spread of probe values and keeps to the scalar function on any
//! difference.

use std::sync::OnceLock;

/// `out[i] = x[i].exp()` (bit-identical to `f32::exp`).
pub fn exp_f32(x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    exp_f32_in_place(out);
}

/// As [`exp_f32`], in place.
pub fn exp_f32_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vector_ok() {
        // SAFETY: `vector_ok` found AVX-512F and FMA on this CPU.
        unsafe { x86::exp16(x) };
        return;
    }
    for v in x {
        *v = v.exp();
    }
}

/// Whether the vector path runs here: AVX-512F present and its results
/// equal to `f32::exp` on the probe values (decided once).
#[cfg(target_arch = "x86_64")]
fn vector_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")) {
            return false;
        }
        let probes = probe_values();
        let mut got = probes.clone();
        // SAFETY: AVX-512F and FMA checked above.
        unsafe { x86::exp16(&mut got) };
        probes
            .iter()
            .zip(&got)
            .all(|(&x, &y)| same_bits(x.exp(), y))
    })
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(dead_code)]
fn vector_ok() -> bool {
    false
}

/// Equal as bits, or both NaN.
fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// A spread of inputs over exp's whole f32 range, fast and slow paths.
fn probe_values() -> Vec<f32> {
    let mut v: Vec<f32> = (0..4096u32)
        // Every 2^20-th bit pattern, offset to vary the mantissa's low bits.
        .map(|i| f32::from_bits(i.wrapping_mul(0x0010_0000) ^ i.wrapping_mul(0x9e37)))
        .collect();
    v.extend((-1040..=890).map(|i| i as f32 * 0.1 + 0.0123));
    v.extend([
        0.0,
        -0.0,
        1.0,
        -1.0,
        88.7,
        -103.5,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 32/ln 2.
    const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
    /// 1.5 · 2^52: adding it rounds to an integer held in the low bits.
    const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
    /// The cubic's coefficients, scaled for r in units of ln 2 / 32.
    const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
    const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
    const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);
    /// bits(2^(i/32)) − (i << 47).
    static TABLE: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// Inputs whose top 12 bits (sign cleared) exceed this take the scalar
    /// path: |x| ≥ 88, ∞ and NaN.
    const FAST_TOP: i32 = 0x42a;

    /// exp of eight f64 lanes (each an f32 widened), rounded to f32.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn exp8(xd: __m512d) -> __m256 {
        let kd = _mm512_fmadd_pd(_mm512_set1_pd(INV_LN2_N), xd, _mm512_set1_pd(SHIFT));
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, _mm512_set1_pd(SHIFT));
        let r = _mm512_fmsub_pd(_mm512_set1_pd(INV_LN2_N), xd, kd);
        // T[k mod 32] by two two-register permutes (entries 0..16 and
        // 16..32, by bits 0..3) and a blend on bit 4: cheaper than a gather.
        let tab = TABLE.as_ptr() as *const __m512i;
        let lo =
            _mm512_permutex2var_epi64(_mm512_loadu_si512(tab), ki, _mm512_loadu_si512(tab.add(1)));
        let hi = _mm512_permutex2var_epi64(
            _mm512_loadu_si512(tab.add(2)),
            ki,
            _mm512_loadu_si512(tab.add(3)),
        );
        let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
        let t = _mm512_mask_blend_epi64(upper, lo, hi);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let z = _mm512_fmadd_pd(r, _mm512_set1_pd(C0), _mm512_set1_pd(C1));
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(r, _mm512_set1_pd(C2), _mm512_set1_pd(1.0));
        let y = _mm512_fmadd_pd(z, r2, y);
        _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
    }

    /// exp of sixteen lanes; lanes outside the fast range are `f32::exp`'s.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn exp_block(x: __m512) -> __m512 {
        let lo = exp8(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
        let hi = exp8(_mm512_cvtps_pd(_mm256_castpd_ps(
            _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)),
        )));
        let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(_mm512_castps256_ps512(lo)),
            _mm256_castps_pd(hi),
        ));
        let top = _mm512_and_si512(
            _mm512_srli_epi32::<20>(_mm512_castps_si512(x)),
            _mm512_set1_epi32(0x7ff),
        );
        let slow = _mm512_cmpgt_epi32_mask(top, _mm512_set1_epi32(FAST_TOP));
        if slow == 0 {
            return y;
        }
        let mut xs = [0f32; 16];
        let mut ys = [0f32; 16];
        _mm512_storeu_ps(xs.as_mut_ptr(), x);
        _mm512_storeu_ps(ys.as_mut_ptr(), y);
        for (i, (y, x)) in ys.iter_mut().zip(xs).enumerate() {
            if slow & (1 << i) != 0 {
                *y = x.exp();
            }
        }
        _mm512_loadu_ps(ys.as_ptr())
    }

    /// `x[i] = exp(x[i])` in place, sixteen at a time; the tail through a
    /// padded block.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn exp16(x: &mut [f32]) {
        let n = x.len();
        let mut i = 0;
        while i + 16 <= n {
            let p = x.as_mut_ptr().add(i);
            _mm512_storeu_ps(p, exp_block(_mm512_loadu_ps(p)));
            i += 16;
        }
        if i < n {
            let mut pad = [0f32; 16];
            pad[..n - i].copy_from_slice(&x[i..]);
            let mut res = [0f32; 16];
            _mm512_storeu_ps(res.as_mut_ptr(), exp_block(_mm512_loadu_ps(pad.as_ptr())));
            x[i..].copy_from_slice(&res[..n - i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 2^8-th f32 bit pattern (16.7 M values, both signs, every
    /// exponent), plus a window of 4096 patterns around every power of two,
    /// through the vector kernel itself (not through the run-time probe,
    /// which would hide a wrong kernel behind the scalar path), against
    /// `f32::exp`. On a machine with AVX-512 whose C library computes `expf`
    /// otherwise this test fails, while the executor keeps to the scalar
    /// function there.
    #[test]
    fn vector_exp_equals_the_scalar_one_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        let vector =
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let vector = false;
        if !vector {
            eprintln!("no AVX-512 here: only the scalar path runs");
        }
        let mut xs: Vec<f32> = (0..1u32 << 24)
            .map(|i| f32::from_bits(i << 8 | (i & 0xff)))
            .collect();
        for e in 0u32..256 {
            for sign in [0, 1u32 << 31] {
                let base = sign | e << 23;
                xs.extend((0..2048u32).map(|m| f32::from_bits(base | m)));
                xs.extend((0..2048u32).map(|m| f32::from_bits(base | (0x7f_ffff - m))));
            }
        }
        // Lengths that are not a multiple of sixteen exercise the tail.
        xs.extend([0.5, -0.25, 87.9, 88.8, -103.2, -103.4, -104.0]);
        let mut got = xs.clone();
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: AVX-512F and FMA checked above.
            unsafe { x86::exp16(&mut got) };
        }
        if !vector {
            exp_f32(&xs, &mut got);
        }
        for (&x, &y) in xs.iter().zip(&got) {
            assert!(
                same_bits(x.exp(), y),
                "exp({x:e} = {:#010x}) = {y:e}, f32::exp gives {:e}",
                x.to_bits(),
                x.exp()
            );
        }
        let mut inplace = xs.clone();
        exp_f32_in_place(&mut inplace);
        assert!(inplace.iter().zip(&got).all(|(&a, &b)| same_bits(a, b)));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(vector_ok(), vector, "the run-time probe disagrees");
    }

    /// Every one of the 2^32 f32 bit patterns (about 18 s on 2 cores; run
    /// with `cargo test --release -p coopc-runtime vexp -- --ignored`).
    #[test]
    #[ignore = "exhaustive: 2^32 inputs"]
    fn vector_exp_equals_the_scalar_one_on_every_f32() {
        use rayon::prelude::*;
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            let bad: u64 = (0..1u32 << 16)
                .into_par_iter()
                .map(|hi| {
                    let xs: Vec<f32> = (0..1u32 << 16)
                        .map(|lo| f32::from_bits(hi << 16 | lo))
                        .collect();
                    let mut got = xs.clone();
                    // SAFETY: AVX-512F and FMA checked above.
                    unsafe { x86::exp16(&mut got) };
                    xs.iter()
                        .zip(&got)
                        .filter(|(&x, &y)| !same_bits(x.exp(), y))
                        .inspect(|(&x, &y)| {
                            eprintln!("exp({x:e}) = {y:e}, f32::exp gives {:e}", x.exp())
                        })
                        .count() as u64
                })
                .sum();
            assert_eq!(bad, 0, "{bad} inputs differ");
        }
    }
}

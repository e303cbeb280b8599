//! The generated CUDA C++ of every kernel of the default example's
//! programs (meta-step, scorer, decode step, and the sampler's kernels)
//! and of the medium truncated
//! bench pipeline's (d_model 1024,
//! vocabulary 32k: the register-blocked and chunked variants), checked for syntax and types by a host C++ compiler (`g++
//! -fsyntax-only`) against a header that declares the CUDA built-ins the
//! kernels use. NVRTC compiles the same text on a GPU machine; this catches
//! code generation that would not compile there without one. Needs `g++`
//! (`.ci/run` installs it and sets `COOPC_REQUIRE_CXX=1`); without it and
//! without that variable the test says so and checks nothing else.

use coopc_compiler::fusion::fuse;
use coopc_compiler::lowering::{lower_logprobs, lower_meta_step, BatchShapes};
use coopc_compiler::schedule::schedule;
use coopc_kernels::source::{schedule_sources, PART_MARK};
use std::path::Path;
use std::process::Command;

/// Declarations of the CUDA built-ins and qualifiers the generated kernels
/// use, for a host compiler.
const CUDA_STUB: &str = r#"#pragma once
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __restrict__
#define __launch_bounds__(x)
#define __align__(x) __attribute__((aligned(x)))
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
inline uint3 make_uint3(unsigned a, unsigned b, unsigned c) { return uint3{a, b, c}; }
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
inline void __syncthreads() {}
using std::isnan; using std::isinf; using std::min; using std::max;
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
"#;

fn have_cxx() -> bool {
    Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Each compilation unit of a kernel source: (name, text).
fn units(name: &str, cuda: &str) -> Vec<(String, String)> {
    if !cuda.contains(PART_MARK) {
        return vec![(name.to_string(), cuda.to_string())];
    }
    cuda.split(PART_MARK)
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (first, rest) = p.split_once('\n').unwrap_or((p, ""));
            (first.trim().to_string(), rest.to_string())
        })
        .collect()
}

fn check_unit(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let file = dir.join(format!("{name}.cu"));
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let out = Command::new("g++")
        .args(["-std=c++17", "-fsyntax-only", "-x", "c++", "-I"])
        .arg(dir)
        .arg(&file)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name}:\n{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.contains("error"))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

#[test]
fn generated_cuda_passes_a_host_compiler_syntax_check() {
    if !have_cxx() {
        assert!(
            std::env::var_os("COOPC_REQUIRE_CXX").is_none(),
            "g++ is required (COOPC_REQUIRE_CXX is set)"
        );
        eprintln!("g++ not found: the CUDA syntax check did not run");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut graphs = Vec::new();
    for pipeline in [
        "examples/addition.toml",
        "benches/pipelines/medium-truncated.toml",
    ] {
        let (_, spec) = coopc_compiler::frontend::load_pipeline(&root.join(pipeline))
            .unwrap_or_else(|e| panic!("{pipeline}: {e}"));
        let shapes = BatchShapes::from_spec(&spec);
        graphs.push(lower_meta_step(&spec, shapes).graph);
        graphs.push(lower_logprobs(&spec, shapes));
        let dtype = coopc_compiler::lowering::float_dtype(spec.backend.dtype);
        graphs.push(coopc_compiler::decode::decode_step_program(
            &spec.model,
            &spec.lora,
            dtype,
            spec.rl.batch_size(),
            spec.train.seq_len,
        ));
    }
    let dir = std::env::temp_dir().join(format!("coopc-cuda-syntax-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cuda_runtime.h"), CUDA_STUB).unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    let mut seen = std::collections::HashSet::new();
    for (i, g) in graphs.iter().enumerate() {
        let fused = fuse(g, &schedule(g).order);
        for (src, _) in schedule_sources(g, &fused).expect("kernels compile to CUDA") {
            for (name, text) in units(&src.name, &src.cuda) {
                // The same kernel text under another number is checked once.
                let body = text.replace(&name, "");
                if !seen.insert(body) {
                    continue;
                }
                checked += 1;
                let name = format!("g{i}_{name}");
                if let Err(e) = check_unit(&dir, &name, &text) {
                    failures.push(e);
                }
            }
        }
    }
    // The sampler's kernels, launched outside any program's schedule.
    for part in coopc_kernels::source::SamplePart::ALL {
        let src = coopc_kernels::source::Traced::Sample(part)
            .source(part.name())
            .expect("the sampler compiles to CUDA");
        checked += 1;
        if let Err(e) = check_unit(&dir, &src.name, &src.cuda) {
            failures.push(e);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(checked > 50, "only {checked} kernels checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} kernels fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

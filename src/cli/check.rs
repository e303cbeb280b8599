//! `coopc check PIPELINE`: parses and validates a `pipeline.toml` without
//! compiling it, and prints either a one-line summary or the diagnostics.

use coopc_compiler::frontend::load_pipeline;
use coopc_compiler::model::{lora_shapes, parameter_count, theta_shapes};
use coopc_compiler::spec::{HypergradKind, PipelineSpec};
use std::path::Path;

/// Checks the pipeline at `path`; returns the process exit code: 0 when it
/// is valid (summary on stdout), 2 when it is invalid or unreadable
/// (diagnostics on stderr).
pub fn check(path: &Path) -> i32 {
    match load_pipeline(path) {
        Ok((_, spec)) => {
            println!("ok: {}: {}", path.display(), summary(&spec));
            0
        }
        Err(e) => {
            eprint!("{}", e.render());
            2
        }
    }
}

/// One line: the method, the hypergradient, the model's shape and its
/// parameter counts.
fn summary(spec: &PipelineSpec) -> String {
    let m = &spec.model;
    let hg = &spec.bilevel.hypergradient;
    let hypergradient = match hg.kind {
        HypergradKind::FirstOrder => format!("first_order, unroll {}", hg.unroll),
        HypergradKind::Truncated => {
            format!("truncated, unroll {}, backprop {}", hg.unroll, hg.backprop)
        }
        HypergradKind::FiniteDifference { eps } => format!(
            "finite_difference, unroll {}, backprop {}, eps {eps}",
            hg.unroll, hg.backprop
        ),
    };
    let (base, adapter) = parameter_counts(spec);
    format!(
        "method {} ({hypergradient}); model d_model {} x {} layer{}, {} heads ({} kv), d_ff {}, vocab {}, max_seq {}; {} base parameters, {} LoRA parameters (rank {})",
        spec.bilevel.method.name(),
        m.d_model,
        m.n_layers,
        if m.n_layers == 1 { "" } else { "s" },
        m.n_heads,
        m.n_kv_heads,
        m.d_ff,
        m.vocab_size,
        m.max_seq,
        group_thousands(base),
        group_thousands(adapter),
        spec.lora.rank,
    ) + &lower_and_source(spec)
}

/// What the lower level trains when it is not all of θ, and where θ comes
/// from when it is a model folder.
fn lower_and_source(spec: &PipelineSpec) -> String {
    let mut s = String::new();
    if let Some(l) = &spec.model.lower {
        let n = coopc_compiler::params::parameter_count(
            &coopc_compiler::params::lower_lora_shapes(&spec.model),
        );
        s += &format!(
            "; lower level: a LoRA of θ, {} parameters (rank {})",
            group_thousands(n as u128),
            l.rank
        );
    }
    if let Some(dir) = &spec.model.from {
        s += &format!("; from {dir}");
    }
    s
}

/// Parameters of the base model θ and of the LoRA adapter w.
fn parameter_counts(spec: &PipelineSpec) -> (u128, u128) {
    let theta = parameter_count(&theta_shapes(&spec.model));
    let lora = parameter_count(&lora_shapes(&spec.model, &spec.lora));
    (theta as u128, lora as u128)
}

/// 1234567 → "1,234,567".
fn group_thousands(x: u128) -> String {
    let digits: Vec<char> = x.to_string().chars().collect();
    let groups: Vec<String> = digits
        .rchunks(3)
        .rev()
        .map(|g| g.iter().collect())
        .collect();
    groups.join(",")
}

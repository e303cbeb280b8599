//! The compile driver: spec → plan. Lowers every program the runtime runs
//! (the meta-step, the log-prob scorer, the decode step of the RL batch, the
//! LoRA merge), runs the pass pipeline, schedules and fuses each, and
//! records its typed signature. Nothing after this builds, schedules or
//! fuses a graph.

use crate::decode::{cache_output, decode_step_program, lora_merge_program};
use crate::frontend::FrontendError;
use crate::fusion::fuse;
use crate::ir::{Graph, TensorType};
use crate::lowering::{
    lower_logprobs, lower_meta_step, meta_step_input_role, meta_step_output_role, BatchShapes,
};
use crate::params::{lora_shapes, lower_lora_shapes, theta_shapes};
use crate::passes::Pipeline;
use crate::plan::{
    cache_input, pipeline_hash, Plan, Port, Program, ProgramKind, Role, Signature, DECODE_IDS,
    DECODE_LOGITS, DECODE_POS, ENTROPY, LOGPROBS, TOKEN_IDS,
};
use crate::schedule::schedule;
use crate::spec::{LoraSpec, PipelineSpec};
use std::path::Path;

/// Compiles a checked pipeline spec into a plan (with no pipeline source
/// recorded: see [`compile_file`] for a plan that knows its file).
pub fn compile(spec: PipelineSpec) -> Plan {
    // The front end checked that the batches split into micro-batches.
    compile_for_world(spec, 1).unwrap_or_else(|e| panic!("a checked pipeline: {e}"))
}

/// Compiles the plan of one process of a data-parallel run of `world`
/// processes: its programs take the process's share of each batch (see
/// [`BatchShapes::for_world`]) and sum gradients over the processes.
/// `world = 1` is [`compile`]. Fails when the batches do not split evenly.
pub fn compile_for_world(spec: PipelineSpec, world: usize) -> Result<Plan, String> {
    let shapes = BatchShapes::for_world(&spec, world)?;
    let process = BatchShapes::per_process(&spec, world)?;
    Ok(compile_with_shapes(spec, shapes, process, world.max(1)))
}

/// The meta-step for one program instance's `shapes`; the sampler's and
/// scorer's programs for one `process`'s rows.
fn compile_with_shapes(
    spec: PipelineSpec,
    shapes: BatchShapes,
    process: BatchShapes,
    world: usize,
) -> Plan {
    // The lowering runs the pass pipeline on the meta-step itself (its
    // memory plan is chosen on optimised graphs).
    let ms = lower_meta_step(&spec, shapes);
    let meta_signature = meta_step_signature(&spec, &ms.graph);

    // The decode step samples (this process's share of) the RL batch's rollouts.
    let (decode, merge) = sampling_programs(&spec, process.rl_batch, process.seq_len);
    let mut programs = vec![
        compile_program(ProgramKind::MetaStep, ms.graph, meta_signature),
        compile_logprobs_for(&spec, process),
        decode,
    ];
    programs.extend(merge);
    let mut notes = ms.notes;
    if shapes.world > 1 {
        let (sums, bytes) = all_reduce_volume(&programs[0].graph);
        let micro = shapes.world / world;
        notes.push(format!(
            "data parallel: {world} process(es){}, each with {} SFT and {} RL rows per batch; {sums} sums per meta-step, {} each process sends and receives{}",
            if micro > 1 { format!(" × {micro} micro-batches") } else { String::new() },
            process.sft_batch,
            process.rl_batch,
            crate::schedule::human_bytes(bytes * micro),
            if micro > 1 { " (counting each micro-batch's)" } else { "" }
        ));
    }
    Plan {
        spec,
        pipeline_hash: String::new(),
        pipeline_path: String::new(),
        programs,
        notes,
        world,
    }
}

/// The sums over processes (`Op::AllReduceSum`) of a program and the bytes
/// they carry, each counted once: what one process contributes to (and
/// receives from) the collectives of one run of the program.
pub fn all_reduce_volume(g: &Graph) -> (usize, usize) {
    g.node_ids()
        .filter(|&id| matches!(g.op(id), crate::ir::Op::AllReduceSum))
        .fold((0, 0), |(n, b), id| {
            let ty = g.ty(id);
            (n + 1, b + ty.numel() * ty.dtype.size_bytes())
        })
}

/// The meta-step's interface: θ and w in the parameter schema's order,
/// then every other input in declaration order, with the roles the
/// lowering's names give them; the outputs in order.
fn meta_step_signature(spec: &PipelineSpec, graph: &Graph) -> Signature {
    signature(
        graph,
        params(spec, &spec.lora),
        meta_step_input_role,
        meta_step_output_role,
    )
}

/// The log-prob scorer of the RL batch: per-token log-probs of `input_ids`
/// `[rl batch, seq_len]` under (θ, w), and the entropies of the
/// distributions they come from.
pub fn compile_logprobs(spec: &PipelineSpec) -> Program {
    compile_logprobs_for(spec, BatchShapes::from_spec(spec))
}

/// The log-prob scorer of batches of `shapes.rl_batch` rows.
pub fn compile_logprobs_for(spec: &PipelineSpec, shapes: BatchShapes) -> Program {
    let mut logprobs = lower_logprobs(spec, shapes);
    Pipeline::standard().run(&mut logprobs);
    let sig = signature(
        &logprobs,
        params(spec, &spec.lora),
        |name| (name == TOKEN_IDS).then_some(Role::TokenIds),
        |name| match name {
            LOGPROBS => Some(Role::LogProbs),
            ENTROPY => Some(Role::Entropy),
            _ => None,
        },
    );
    compile_program(ProgramKind::Logprobs, logprobs, sig)
}

/// The decode step for `batch` rows and sequences of up to `max_len`
/// tokens, which reads θ with the adapted weights merged in, and the LoRA
/// merge that computes those weights (none without adapters). [`compile`]
/// puts them in the plan for the RL batch and the sequence length.
pub fn sampling_programs(
    spec: &PipelineSpec,
    batch: usize,
    max_len: usize,
) -> (Program, Option<Program>) {
    let dt = spec.backend.dtype.dtype();
    let decode = decode_step_program(&spec.model, &spec.lora, dt, batch, max_len);
    let no_lora = LoraSpec {
        targets: vec![],
        ..spec.lora.clone()
    };
    let n_layers = spec.model.n_layers;
    let is_cache = |name: &str| {
        (0..n_layers).any(|l| name == cache_input(l, 'k') || name == cache_input(l, 'v'))
    };
    let decode_signature = signature(
        &decode,
        params_with(spec, &no_lora, false),
        |name| match name {
            DECODE_IDS => Some(Role::TokenIds),
            DECODE_POS => Some(Role::Position),
            _ => is_cache(name).then_some(Role::Cache),
        },
        |name| {
            if name == DECODE_LOGITS {
                return Some(Role::Logits);
            }
            (0..n_layers)
                .flat_map(|l| [(l, 'k'), (l, 'v')])
                .find(|&(l, w)| name == cache_output(l, w))
                .map(|(l, w)| Role::Next {
                    of: cache_input(l, w),
                })
        },
    );
    let merge = lora_merge_program(&spec.model, &spec.lora, dt).map(|g| {
        let sig = signature(
            &g,
            params(spec, &spec.lora),
            |_| None,
            |name| {
                Some(Role::Merged {
                    of: name.to_string(),
                })
            },
        );
        compile_program(ProgramKind::LoraMerge, g, sig)
    });
    (
        compile_program(ProgramKind::DecodeStep, decode, decode_signature),
        merge,
    )
}

/// The policy's parameters as the programs of `spec`'s plan declare them:
/// θ's ports, then w's, in the parameter schema's order.
pub fn parameter_ports(spec: &PipelineSpec) -> Vec<Port> {
    params(spec, &spec.lora)
}

/// θ's ports and the ports of the LoRA factors `lora` names, in the
/// parameter schema's order: θ (trained at the lower level, or frozen
/// under a lower-level LoRA), the lower-level LoRA when there is one, w.
fn params(spec: &PipelineSpec, lora: &LoraSpec) -> Vec<Port> {
    params_with(spec, lora, true)
}

/// [`params`], leaving out the lower-level LoRA unless `lower_lora`
/// (the decode step reads it merged into θ's weights).
fn params_with(spec: &PipelineSpec, lora: &LoraSpec, lower_lora: bool) -> Vec<Port> {
    let dt = spec.backend.dtype.dtype();
    let port = |(name, shape): (String, Vec<usize>), role: Role| Port {
        name,
        ty: TensorType::new(dt, shape),
        role,
    };
    let theta_role = if spec.model.lower.is_some() {
        Role::Frozen
    } else {
        Role::Theta
    };
    let lower: Vec<(String, Vec<usize>)> = if lower_lora {
        lower_lora_shapes(&spec.model)
    } else {
        Vec::new()
    };
    theta_shapes(&spec.model)
        .into_iter()
        .map(|p| port(p, theta_role.clone()))
        .chain(lower.into_iter().map(|p| port(p, Role::Theta)))
        .chain(
            lora_shapes(&spec.model, lora)
                .into_iter()
                .map(|p| port(p, Role::Lora)),
        )
        .collect()
}

/// Reads, checks and compiles the pipeline file at `path`; the plan records
/// the file and the hash of its text, so that a later change to the file
/// makes the plan stale.
pub fn compile_file(path: &Path) -> Result<Plan, FrontendError> {
    compile_file_with(path, &crate::frontend::Options::default())
}

/// [`compile_file`] with command-line options (`--model`).
pub fn compile_file_with(
    path: &Path,
    options: &crate::frontend::Options,
) -> Result<Plan, FrontendError> {
    let (source, spec) = crate::frontend::load_pipeline_with(path, options)?;
    let mut plan = compile(spec);
    plan.pipeline_hash = pipeline_hash(&source);
    plan.pipeline_path = path.display().to_string();
    Ok(plan)
}

/// One program of a plan: `graph` (already optimised) scheduled, with its
/// peak estimate, fused into kernels along that schedule.
pub fn compile_program(kind: ProgramKind, graph: Graph, signature: Signature) -> Program {
    let s = schedule(&graph);
    let fused = fuse(&graph, &s.order);
    let program = Program {
        kind,
        graph,
        schedule: s.order,
        peak_bytes: s.peak_bytes,
        fused,
        signature,
    };
    if let Err(e) = program.check_signature() {
        panic!("the compiler built program `{kind}` with a wrong signature: {e}");
    }
    program
}

/// The meta-step for batches of `shapes` reduced to what `coopc grad`
/// reports — the losses, the lower gradient, the hypergradient and θ_K —
/// optimised again without the optimiser updates of w, the shadow and the
/// state, which nothing then reads.
pub fn compile_gradients(spec: &PipelineSpec, shapes: BatchShapes) -> Program {
    let ms = lower_meta_step(spec, shapes);
    let mut sig = meta_step_signature(spec, &ms.graph);
    let theta: std::collections::HashSet<String> =
        ms.theta.iter().map(|(n, _)| n.clone()).collect();
    sig.outputs.retain(|p| match &p.role {
        Role::Metric(m) => *m != crate::plan::Metric::Gain,
        Role::LowerGradient { .. } | Role::Hypergradient { .. } => true,
        Role::Next { of } => theta.contains(of),
        _ => false,
    });
    let mut g = ms.graph;
    let keep: Vec<(String, crate::ir::NodeId)> = g
        .outputs()
        .iter()
        .filter(|(n, _)| sig.output(n).is_some())
        .cloned()
        .collect();
    g.clear_outputs();
    for (n, id) in keep {
        g.set_output(n, id);
    }
    Pipeline::standard().run(&mut g);
    compile_program(ProgramKind::MetaStep, g, sig)
}

/// A graph compiled by itself, outside a plan (tests, benchmarks, tools):
/// scheduled and fused as a plan's programs are, every port a
/// [`Role::Value`]. The graph is not optimised.
pub fn compile_graph(graph: Graph) -> Program {
    let sig = signature(&graph, vec![], |_| Some(Role::Value), |_| Some(Role::Value));
    compile_program(ProgramKind::Graph, graph, sig)
}

/// A signature of `graph`: `params` first (θ and w in the schema's order),
/// then the graph's other inputs in declaration order with the role
/// `input_role` gives them, and its outputs with `output_role`'s. A name
/// neither classifies is a compiler bug.
fn signature(
    graph: &Graph,
    params: Vec<Port>,
    input_role: impl Fn(&str) -> Option<Role>,
    output_role: impl Fn(&str) -> Option<Role>,
) -> Signature {
    let mut inputs = params;
    for (name, ty) in graph.named_inputs() {
        if inputs.iter().any(|p| p.name == name) {
            continue;
        }
        let role = input_role(&name)
            .unwrap_or_else(|| panic!("input `{name}` of a compiled program has no role"));
        inputs.push(Port { name, ty, role });
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|(name, id)| Port {
            name: name.clone(),
            ty: graph.ty(*id).clone(),
            role: output_role(name)
                .unwrap_or_else(|| panic!("output `{name}` of a compiled program has no role")),
        })
        .collect();
    Signature { inputs, outputs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::parse_pipeline;
    use crate::plan::{BatchField, Metric};

    fn tiny() -> PipelineSpec {
        parse_pipeline(
            "[model]\nvocab_size = 32\nd_model = 16\nn_layers = 1\nn_heads = 2\nd_ff = 32\n\
             max_seq = 16\n[lora]\nrank = 2\n[rl]\ngroup_size = 2\nprompts_per_step = 1\n\
             max_new_tokens = 4\nkl_coef = 0.01\n[sft]\nbatch_size = 2\n[train]\nseq_len = 12\n",
        )
        .expect("a valid pipeline")
    }

    #[test]
    fn the_plan_holds_every_program_with_its_fused_kernels_and_a_valid_signature() {
        let plan = compile(tiny());
        plan.validate().unwrap();
        for kind in ProgramKind::ALL {
            let p = plan.program(kind).unwrap_or_else(|| panic!("no {kind}"));
            assert!(!p.fused.kernels.is_empty(), "{kind} has no kernels");
            assert_eq!(p.schedule, schedule(&p.graph).order, "{kind}");
        }
        let ms = plan.meta_step();
        let theta = theta_shapes(&plan.spec.model);
        let lora = lora_shapes(&plan.spec.model, &plan.spec.lora);
        let params: Vec<&str> = ms.signature.parameters().map(|p| p.name.as_str()).collect();
        let want: Vec<&str> = theta.iter().chain(&lora).map(|(n, _)| n.as_str()).collect();
        assert_eq!(params, want, "θ then w, in the schema's order");
        // Every step batch field, λ, metrics, and a next value for every state input.
        for k in 0..plan.spec.bilevel.hypergradient.unroll.max(1) {
            for f in BatchField::ALL {
                let port = ms.signature.input(&f.input_name(k)).unwrap();
                assert_eq!(port.role, Role::Batch { step: k, field: f });
            }
        }
        assert_eq!(
            ms.signature.input(crate::plan::LAMBDA).unwrap().role,
            Role::Lambda
        );
        assert!(ms
            .signature
            .output_with(&Role::Metric(Metric::SftLoss))
            .is_some());
        for port in ms.signature.inputs_where(Role::is_state) {
            let next = ms.signature.output_with(&Role::Next {
                of: port.name.clone(),
            });
            let next = next.unwrap_or_else(|| panic!("no next value of `{}`", port.name));
            assert_eq!(next.ty, port.ty, "{}", port.name);
        }
        // The decode step's caches come back as their next values.
        let decode = plan.decode_step();
        for port in decode.signature.inputs_where(|r| *r == Role::Cache) {
            assert!(decode
                .signature
                .output_with(&Role::Next {
                    of: port.name.clone()
                })
                .is_some());
        }
        assert_eq!(
            decode.signature.input(DECODE_IDS).unwrap().ty.shape,
            vec![plan.spec.rl.batch_size()]
        );
    }

    #[test]
    fn a_plan_round_trips_through_its_file_format_with_fused_kernels_and_signatures() {
        let plan = compile(tiny());
        let bytes = plan.encode().unwrap();
        let back = Plan::decode(&bytes, Path::new("t.plan")).unwrap();
        for (a, b) in plan.programs.iter().zip(&back.programs) {
            assert_eq!(a.kind, b.kind);
            assert_eq!(a.signature, b.signature);
            assert_eq!(a.fused.kernels, b.fused.kernels);
        }
    }
}

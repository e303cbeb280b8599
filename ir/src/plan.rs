//! The plan: what `coopc compile` produces and every later stage reads —
//! the validated pipeline spec, the hash of the pipeline text it came from,
//! and every program the runtime runs (the meta-step, the log-prob scorer,
//! the decode step, the LoRA merge), each with its schedule, its fused
//! kernels and its typed signature — plus its versioned, checksummed file
//! format. Nothing after `compile` builds, schedules or fuses a graph.
//!
//! A plan file is
//!
//! ```text
//! b"COOPCPLAN\n"            magic (10 bytes)
//! u32 little-endian         format version (PLAN_FORMAT_VERSION)
//! u64 little-endian         payload length in bytes
//! [u8; 32]                  sha256 of the payload
//! payload                   the Plan, serde-encoded as CBOR
//! ```
//!
//! The payload is CBOR rather than JSON because graphs carry non-finite
//! constants (the −∞ of attention masks) that JSON cannot represent, and
//! CBOR keeps every f64 bit-exact. `coopc inspect` prints a plan file.

use crate::kernel::FusedSchedule;
pub use crate::signature::*;
use crate::spec::PipelineSpec;
use crate::{Graph, NodeId, Op};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The first bytes of every plan file.
pub const PLAN_MAGIC: &[u8; 10] = b"COOPCPLAN\n";

/// The version of the file format (and of the payload's structure) that this
/// build of coopc writes and reads. Version 2: programs carry their kind,
/// fused kernels and signature, and the decode step and LoRA merge are in
/// the plan. Version 3: the policy loss carries its KL estimator,
/// aggregation, ratio level and surrogate. Version 4: the linear entropy
/// ops, and the log-prob scorer's entropy output.
pub const PLAN_FORMAT_VERSION: u32 = 5;

/// Bytes before the payload: magic, version, payload length, checksum.
pub const PLAN_HEADER_LEN: usize = PLAN_MAGIC.len() + 4 + 8 + 32;

const VERSION_AT: usize = PLAN_MAGIC.len();
const LENGTH_AT: usize = VERSION_AT + 4;
const CHECKSUM_AT: usize = LENGTH_AT + 8;

/// Which program of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProgramKind {
    /// One meta-step: K lower steps, the shadow step, the hypergradient and
    /// the optimiser updates.
    MetaStep,
    /// Per-token log-probs of the RL batch under (θ, w): π_old and π_ref.
    Logprobs,
    /// One autoregressive decode step of the RL batch over a KV cache.
    DecodeStep,
    /// The LoRA factors merged into the weights the decode step reads
    /// (absent when no projection has an adapter).
    LoraMerge,
    /// A graph compiled by itself, outside a plan (tests, benchmarks,
    /// tools): every port plays [`Role::Value`]. A plan never holds one.
    Graph,
}

impl ProgramKind {
    pub const ALL: [ProgramKind; 4] = [
        ProgramKind::MetaStep,
        ProgramKind::Logprobs,
        ProgramKind::DecodeStep,
        ProgramKind::LoraMerge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProgramKind::MetaStep => "meta_step",
            ProgramKind::Logprobs => "logprobs",
            ProgramKind::DecodeStep => "decode_step",
            ProgramKind::LoraMerge => "lora_merge",
            ProgramKind::Graph => "graph",
        }
    }
}

impl fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One compiled program: a graph, the order its nodes run in, the kernels
/// that order fuses into, and its interface.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Program {
    pub kind: ProgramKind,
    pub graph: Graph,
    /// The nodes to run, in order; every operand precedes its users.
    pub schedule: Vec<NodeId>,
    /// Estimated peak buffer bytes along `schedule` (CPU executor).
    pub peak_bytes: usize,
    /// The schedule fused into device kernels (what the device executor
    /// launches and `--emit kernels` prints).
    pub fused: FusedSchedule,
    pub signature: Signature,
}

impl Program {
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Checks that the signature describes the graph: every input the
    /// graph reads is a port of the same type, and the outputs are the
    /// graph's outputs, with their types.
    pub fn check_signature(&self) -> Result<(), String> {
        let g = &self.graph;
        for id in g.node_ids() {
            if let Op::Input { name, ty } = g.op(id) {
                match self.signature.input(name) {
                    None => return Err(format!("input `{name}` is not in the signature")),
                    Some(p) if &p.ty != ty => {
                        return Err(format!(
                            "input `{name}` is {ty} in the graph but {} in the signature",
                            p.ty
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        if g.outputs().len() != self.signature.outputs.len() {
            return Err(format!(
                "the graph has {} outputs, the signature {}",
                g.outputs().len(),
                self.signature.outputs.len()
            ));
        }
        for ((name, id), port) in g.outputs().iter().zip(&self.signature.outputs) {
            if name != &port.name || g.ty(*id) != &port.ty {
                return Err(format!(
                    "output `{name}` ({}) does not match the signature's `{}` ({})",
                    g.ty(*id),
                    port.name,
                    port.ty
                ));
            }
        }
        Ok(())
    }
}

/// A compiled pipeline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub spec: PipelineSpec,
    /// sha256 (hex) of the pipeline source text, see [`pipeline_hash`].
    pub pipeline_hash: String,
    /// The pipeline file the plan was compiled from, as given to `compile`
    /// (empty when compiled from text alone).
    #[serde(default)]
    pub pipeline_path: String,
    pub programs: Vec<Program>,
    /// Decisions the compiler made that a user may want to know about
    /// (memory planning, recomputation, fallbacks).
    pub notes: Vec<String>,
    /// Processes of the data-parallel run the plan was compiled for: its
    /// programs take one process's share of each batch and sum gradients
    /// over the processes. 1 for one process.
    #[serde(default = "one_process")]
    pub world: usize,
}

fn one_process() -> usize {
    1
}

/// sha256 of a pipeline's source text, lower-case hex.
pub fn pipeline_hash(source: &str) -> String {
    crate::file::hex(&Sha256::digest(source.as_bytes()))
}

/// What is wrong with one program of a plan.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("program `{program}`: {reason}")]
pub struct InvalidProgram {
    pub program: String,
    pub reason: String,
}

/// Why a plan could not be read, written or used.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("cannot {action} plan file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// `read` or `write`.
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{} is not a coopc plan file (it does not start with the plan header)", path.display())]
    NotAPlan { path: PathBuf },

    #[error(
        "plan file {} has format version {found}, this coopc reads version {expected}: \
         it was compiled by another coopc version; recompile with `coopc compile`",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error(
        "plan file {} is truncated: expected {expected} bytes, found {got}; \
         recompile with `coopc compile`",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        got: u64,
    },

    #[error("plan file {} is corrupt: {detail}; recompile with `coopc compile`", path.display())]
    Corrupt { path: PathBuf, detail: String },

    #[error("plan file {} cannot be decoded: {message}", path.display())]
    Decode { path: PathBuf, message: String },

    #[error("plan {} cannot be encoded: {message}", path.display())]
    Encode { path: PathBuf, message: String },

    #[error("plan file {} is invalid: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        problem: InvalidProgram,
    },

    #[error(
        "the plan is stale: it was compiled from a pipeline with hash {plan_hash}, \
         but the pipeline now has hash {pipeline_hash}; recompile with `coopc compile`"
    )]
    Stale {
        plan_hash: String,
        pipeline_hash: String,
    },
}

impl Plan {
    /// The program of kind `kind`.
    pub fn program(&self, kind: ProgramKind) -> Option<&Program> {
        self.programs.iter().find(|p| p.kind == kind)
    }

    /// The meta-step (every valid plan has one).
    pub fn meta_step(&self) -> &Program {
        self.program(ProgramKind::MetaStep)
            .expect("a validated plan has a meta-step")
    }

    /// The log-prob scorer (every valid plan has one).
    pub fn logprobs(&self) -> &Program {
        self.program(ProgramKind::Logprobs)
            .expect("a validated plan has a log-prob scorer")
    }

    /// The decode step (every valid plan has one).
    pub fn decode_step(&self) -> &Program {
        self.program(ProgramKind::DecodeStep)
            .expect("a validated plan has a decode step")
    }

    /// The LoRA merge, where the pipeline has adapters.
    pub fn lora_merge(&self) -> Option<&Program> {
        self.program(ProgramKind::LoraMerge)
    }

    /// Checks that program names are unique, every graph passes
    /// `Graph::validate`, and every schedule is a topological order of
    /// existing nodes (each scheduled once) that covers the graph's outputs.
    pub fn validate(&self) -> Result<(), InvalidProgram> {
        let mut kinds = HashSet::new();
        for p in &self.programs {
            let bad = |reason: String| InvalidProgram {
                program: p.name().to_string(),
                reason,
            };
            if !kinds.insert(p.kind) {
                return Err(bad("two programs are of this kind".into()));
            }
            if p.kind == ProgramKind::Graph {
                return Err(bad("a standalone graph is not a program of a plan".into()));
            }
            p.graph.validate().map_err(|e| bad(e.to_string()))?;
            let mut done: HashSet<NodeId> = HashSet::with_capacity(p.schedule.len());
            for &id in &p.schedule {
                if !p.graph.contains(id) {
                    return Err(bad(format!(
                        "the schedule refers to node %{}, which is not in the graph",
                        id.index()
                    )));
                }
                if done.contains(&id) {
                    return Err(bad(format!("the schedule runs node %{} twice", id.index())));
                }
                if let Some(o) = p.graph.inputs(id).into_iter().find(|o| !done.contains(o)) {
                    return Err(bad(format!(
                        "the schedule is not a topological order: node %{} runs before \
                         its operand %{}",
                        id.index(),
                        o.index()
                    )));
                }
                done.insert(id);
            }
            if let Some((name, id)) = p.graph.outputs().iter().find(|(_, id)| !done.contains(id)) {
                return Err(bad(format!(
                    "output `{name}` (node %{}) is not scheduled",
                    id.index()
                )));
            }
            for k in &p.fused.kernels {
                if let Some(id) = k.writes().into_iter().find(|id| !p.graph.contains(*id)) {
                    return Err(bad(format!(
                        "a fused kernel writes node %{}, which is not in the graph",
                        id.index()
                    )));
                }
            }
            p.check_signature().map_err(bad)?;
        }
        for kind in [
            ProgramKind::MetaStep,
            ProgramKind::Logprobs,
            ProgramKind::DecodeStep,
        ] {
            if !kinds.contains(&kind) {
                return Err(InvalidProgram {
                    program: kind.name().to_string(),
                    reason: "the plan has no such program".into(),
                });
            }
        }
        Ok(())
    }

    /// Reads a plan and refuses it when the pipeline file it was compiled
    /// from still exists but has changed since (see [`Plan::check_source`]).
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let plan = Plan::read(path)?;
        plan.check_source()?;
        Ok(plan)
    }

    /// Compares the recorded pipeline file with the plan's hash. A file that
    /// is gone is not an error: the plan carries its whole specification.
    pub fn check_source(&self) -> Result<(), PlanError> {
        if self.pipeline_path.is_empty() {
            return Ok(());
        }
        match std::fs::read_to_string(&self.pipeline_path) {
            Ok(text) => self.check_fresh(&text).map_err(|e| match e {
                PlanError::Stale {
                    plan_hash,
                    pipeline_hash,
                } => PlanError::Stale {
                    plan_hash,
                    pipeline_hash: format!("{pipeline_hash} (file {})", self.pipeline_path),
                },
                other => other,
            }),
            Err(_) => Ok(()),
        }
    }

    /// Refuses a plan compiled from a pipeline text other than `source`.
    pub fn check_fresh(&self, source: &str) -> Result<(), PlanError> {
        let now = pipeline_hash(source);
        if now == self.pipeline_hash {
            Ok(())
        } else {
            Err(PlanError::Stale {
                plan_hash: self.pipeline_hash.clone(),
                pipeline_hash: now,
            })
        }
    }

    /// The bytes of the plan file (header and payload), without validating
    /// the plan first.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut payload = Vec::new();
        ciborium::into_writer(self, &mut payload).map_err(|e| e.to_string())?;
        let mut bytes = Vec::with_capacity(PLAN_HEADER_LEN + payload.len());
        bytes.extend_from_slice(PLAN_MAGIC);
        bytes.extend_from_slice(&PLAN_FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(&payload));
        bytes.extend_from_slice(&payload);
        Ok(bytes)
    }

    /// Parses, checks and validates the bytes of a plan file; `path` only
    /// names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Plan, PlanError> {
        let path_buf = || path.to_path_buf();
        let got = bytes.len() as u64;
        let truncated = |expected: usize| PlanError::Truncated {
            path: path_buf(),
            expected: expected as u64,
            got,
        };

        let magic_len = bytes.len().min(PLAN_MAGIC.len());
        if bytes[..magic_len] != PLAN_MAGIC[..magic_len] {
            return Err(PlanError::NotAPlan { path: path_buf() });
        }
        if bytes.len() < LENGTH_AT {
            return Err(truncated(PLAN_HEADER_LEN));
        }
        let version = u32::from_le_bytes(le_array(&bytes[VERSION_AT..LENGTH_AT]));
        if version != PLAN_FORMAT_VERSION {
            return Err(PlanError::UnsupportedVersion {
                path: path_buf(),
                found: version,
                expected: PLAN_FORMAT_VERSION,
            });
        }
        if bytes.len() < PLAN_HEADER_LEN {
            return Err(truncated(PLAN_HEADER_LEN));
        }
        let len = u64::from_le_bytes(le_array(&bytes[LENGTH_AT..CHECKSUM_AT]));
        let expected = len.saturating_add(PLAN_HEADER_LEN as u64);
        if got < expected {
            return Err(PlanError::Truncated {
                path: path_buf(),
                expected,
                got,
            });
        }
        if got > expected {
            return Err(PlanError::Corrupt {
                path: path_buf(),
                detail: format!(
                    "{} bytes follow the {len}-byte payload the header announces",
                    got - expected
                ),
            });
        }
        let payload = &bytes[PLAN_HEADER_LEN..];
        if Sha256::digest(payload)[..] != bytes[CHECKSUM_AT..PLAN_HEADER_LEN] {
            return Err(PlanError::Corrupt {
                path: path_buf(),
                detail: "the payload does not match its sha256 checksum".into(),
            });
        }
        let plan: Plan = ciborium::from_reader(payload).map_err(|e| PlanError::Decode {
            path: path_buf(),
            message: e.to_string(),
        })?;
        plan.validate().map_err(|problem| PlanError::Invalid {
            path: path_buf(),
            problem,
        })?;
        Ok(plan)
    }

    /// Validates the plan and writes it to `path` atomically: to a temporary
    /// file in the same directory, then renamed over `path`.
    pub fn write(&self, path: &Path) -> Result<(), PlanError> {
        self.validate().map_err(|problem| PlanError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        let bytes = self.encode().map_err(|message| PlanError::Encode {
            path: path.to_path_buf(),
            message,
        })?;
        crate::file::write_atomically(path, &bytes).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            action: "write",
            source,
        })
    }

    /// Reads, checks and validates the plan file at `path`.
    pub fn read(path: &Path) -> Result<Plan, PlanError> {
        let bytes = std::fs::read(path).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            action: "read",
            source,
        })?;
        Plan::decode(&bytes, path)
    }
}

/// The first N bytes of a slice known to hold at least N.
fn le_array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::*;
    use crate::{execution_order, to_text, DType};

    /// Written out field by field because this crate has no front end to
    /// parse a pipeline with (the compiler's tests parse TOML instead).
    fn spec() -> PipelineSpec {
        PipelineSpec {
            model: ModelSpec {
                vocab_size: 32,
                d_model: 16,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                d_ff: 48,
                max_seq: 24,
                rope_theta: 10000.0,
                rms_eps: 1e-6,
                tie_embeddings: true,
                qkv_bias: true,
                head_dim: None,
                qk_norm: false,
                rope_scaling: None,
                from: None,
                lower: None,
            },
            lora: LoraSpec {
                rank: 4,
                alpha: 8.0,
                targets: vec![Projection::QProj, Projection::VProj, Projection::DownProj],
            },
            task: TaskSpec {
                kind: TaskKind::Jsonl,
                tokenizer: Some("tokenizer.json".into()),
                sft_file: Some("sft.jsonl".into()),
                rl_file: Some("rl.jsonl".into()),
                eval_file: None,
                reward_correct: 1.0,
                reward_wrong: -1.0,
                sft_max_digits: 3,
                rl_max_digits: 4,
                eval_digits: None,
                format: DataFormat::PromptResponse,
                chat_template: false,
                system_prompt: None,
                reward_malformed: None,
                sft_pool: None,
                sft_flaw: Default::default(),
                sft_carry_free: false,
                countdown: Default::default(),
            },
            rl: RlSpec {
                skip_no_signal: true,
                mask_truncated: false,
                dynamic_sampling: false,
                max_sampling_rounds: 4,
                group_size: 4,
                prompts_per_step: 2,
                clip_low: 0.2,
                clip_high: 0.28,
                kl_coef: 0.01,
                kl_estimator: KlEstimator::K3,
                kl_in_reward: false,
                advantage: Advantage::GroupStd,
                loss_agg: LossAgg::SeqMean,
                ratio_level: RatioLevel::Token,
                loss: PolicyLoss::PpoClip,
                entropy_coef: 0.0,
                updates_per_batch: 1,
                mini_batches: 1,
                max_new_tokens: 8,
                temperature: 1.0,
                top_p: 0.95,
                top_k: 0,
            },
            sft: SftSpec {
                batch_size: 4,
                cold_start_steps: 0,
            },
            bilevel: BilevelSpec {
                method: Method::Bridge,
                lambda: Lambda::Linear {
                    start: 0.1,
                    end: 0.9,
                },
                shadow: ShadowMode::Persistent,
                hypergradient: HypergradSpec {
                    kind: HypergradKind::FiniteDifference { eps: 0.01 },
                    unroll: 2,
                    backprop: 1,
                },
            },
            optim: OptimSpecs {
                lower: OptimSpec::new(OptimKind::Momentum { momentum: 0.9 }, 1e-3),
                upper: OptimSpec {
                    kind: OptimKind::AdamW {
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                        weight_decay: 0.01,
                    },
                    lr: 3e-4,
                    schedule: Default::default(),
                    max_grad_norm: None,
                },
            },
            train: TrainSpec {
                steps: 10,
                seed: 7,
                eval_every: 5,
                seq_len: 24,
                on_nonfinite: Default::default(),
                max_nonfinite_in_row: 3,
                eval_samples: 0,
                eval_temperature: 1.0,
                micro_batches: 1,
            },
            backend: BackendSpec {
                kind: BackendKind::Auto,
                dtype: Precision::F32,
                matmul: Default::default(),
                memory_budget: None,
            },
        }
    }

    /// A masked softmax-like graph with a −∞ constant, an f64 literal with
    /// awkward values, and a hole left by a removed node.
    fn graph() -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, vec![2, 3]);
        let gone = g.exp(x);
        let mask = g.full(f64::NEG_INFINITY, DType::F32, vec![2, 3]);
        let m = g.max(x, mask);
        let l = g.log_softmax(m);
        let s = g.sum_all(l);
        g.remove(gone);
        let c = g.literal(&[0.1, -0.0, f64::MAX, 1e-310], DType::F64, vec![4]);
        let cs = g.sum_all(c);
        g.set_output("loss", s);
        g.set_output("c", cs);
        g
    }

    fn plan() -> Plan {
        let source = "[model]\nd_model = 16\n";
        Plan {
            spec: spec(),
            pipeline_hash: pipeline_hash(source),
            pipeline_path: String::new(),
            programs: vec![
                program(ProgramKind::MetaStep, graph()),
                program(ProgramKind::Logprobs, {
                    let mut g = Graph::new();
                    let a = g.input("a", DType::F64, vec![3, 2]);
                    let b = g.input("b", DType::F64, vec![2, 5]);
                    let y = g.matmul(a, b);
                    g.set_output("y", y);
                    g
                }),
                program(ProgramKind::DecodeStep, {
                    let mut g = Graph::new();
                    let a = g.input("ids", DType::I32, vec![3]);
                    g.set_output("ids_out", a);
                    g
                }),
            ],
            notes: vec!["recompute: nothing".into()],
            world: 1,
        }
    }

    /// A program with every node scheduled in execution order, no fused
    /// kernels, and a signature read off the graph (every port a result).
    fn program(kind: ProgramKind, graph: Graph) -> Program {
        let bound = graph.node_ids().map(|id| id.index() + 1).max().unwrap_or(0);
        let mut needed = vec![false; bound];
        for id in graph.node_ids() {
            needed[id.index()] = true;
        }
        let schedule = execution_order(&graph, &needed);
        let port = |name: &String, ty: &crate::TensorType| Port {
            name: name.clone(),
            ty: ty.clone(),
            role: Role::LogProbs,
        };
        let signature = Signature {
            inputs: graph
                .node_ids()
                .filter_map(|id| match graph.op(id) {
                    Op::Input { name, ty } => Some(port(name, ty)),
                    _ => None,
                })
                .collect(),
            outputs: graph
                .outputs()
                .iter()
                .map(|(name, id)| port(name, graph.ty(*id)))
                .collect(),
        };
        Program {
            kind,
            graph,
            schedule,
            peak_bytes: 0,
            fused: FusedSchedule {
                kernels: vec![],
                fused_nodes: 0,
            },
            signature,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("coopc-plan-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pipeline_hash_is_sha256_hex() {
        assert_eq!(
            pipeline_hash(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            pipeline_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn write_then_read_gives_an_identical_plan() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("p.plan");
        let p = plan();
        p.write(&path).unwrap();
        let q = Plan::read(&path).unwrap();
        assert_eq!(p.encode().unwrap(), q.encode().unwrap());
        assert_eq!(p.spec, q.spec);
        assert_eq!(p.pipeline_hash, q.pipeline_hash);
        assert_eq!(p.notes, q.notes);
        assert_eq!(p.programs.len(), q.programs.len());
        for (a, b) in p.programs.iter().zip(&q.programs) {
            assert_eq!(a.kind, b.kind);
            assert_eq!(a.signature, b.signature);
            assert_eq!(to_text(&a.graph), to_text(&b.graph));
            assert_eq!(a.schedule, b.schedule);
            assert_eq!(a.peak_bytes, b.peak_bytes);
        }
        assert!(q.program(ProgramKind::Logprobs).is_some());
        assert!(q.lora_merge().is_none());
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_constants_survive_the_round_trip() {
        let bytes = plan().encode().unwrap();
        let q = Plan::decode(&bytes, Path::new("p.plan")).unwrap();
        let g = &q.programs[0].graph;
        assert!(to_text(g).contains("full[-inf]"), "{}", to_text(g));
        let values = g
            .node_ids()
            .find_map(|id| match g.op(id) {
                crate::Op::Literal { values, .. } => Some(values.clone()),
                _ => None,
            })
            .unwrap();
        let bits: Vec<u64> = values.iter().map(|v| v.get().to_bits()).collect();
        let want: Vec<u64> = [0.1, -0.0, f64::MAX, 1e-310].map(f64::to_bits).to_vec();
        assert_eq!(bits, want);
    }

    #[test]
    fn truncated_files_are_refused() {
        let bytes = plan().encode().unwrap();
        let n = bytes.len();
        for cut in [0, 1, 5, 9, 10, 12, 14, 20, 22, 40, 53, 54, 55, n / 2, n - 1] {
            let e = Plan::decode(&bytes[..cut], Path::new("p.plan")).unwrap_err();
            match e {
                PlanError::Truncated { expected, got, .. } => {
                    assert_eq!(got, cut as u64);
                    let want = if cut < PLAN_HEADER_LEN {
                        PLAN_HEADER_LEN
                    } else {
                        n
                    };
                    assert_eq!(expected, want as u64, "cut at {cut}");
                }
                other => panic!("cut at {cut}: {other}"),
            }
        }
    }

    #[test]
    fn flipping_any_byte_is_refused_with_the_matching_error() {
        let bytes = plan().encode().unwrap();
        let payload_len = (bytes.len() - PLAN_HEADER_LEN) as u64;
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let e = Plan::decode(&b, Path::new("p.plan")).unwrap_err();
            let ok = match (&e, i) {
                (PlanError::NotAPlan { .. }, 0..=9) => true,
                (PlanError::UnsupportedVersion { found, .. }, 10..=13) => {
                    *found != PLAN_FORMAT_VERSION
                }
                (PlanError::Truncated { .. }, 14..=21) | (PlanError::Corrupt { .. }, 14..=21) => {
                    let len = u64::from_le_bytes(le_array(&b[LENGTH_AT..CHECKSUM_AT]));
                    matches!(e, PlanError::Truncated { .. }) == (len > payload_len)
                }
                (PlanError::Corrupt { .. }, _) => i >= CHECKSUM_AT,
                _ => false,
            };
            assert!(ok, "byte {i}: {e}");
        }
    }

    #[test]
    fn another_format_version_is_refused() {
        let mut bytes = plan().encode().unwrap();
        bytes[VERSION_AT..LENGTH_AT].copy_from_slice(&1u32.to_le_bytes());
        let e = Plan::decode(&bytes, Path::new("old.plan")).unwrap_err();
        assert!(matches!(
            e,
            PlanError::UnsupportedVersion {
                found: 1,
                expected: PLAN_FORMAT_VERSION,
                ..
            }
        ));
        let msg = e.to_string();
        assert!(msg.contains("old.plan") && msg.contains("recompile with `coopc compile`"));
    }

    #[test]
    fn a_file_that_is_not_a_plan_is_refused() {
        let e = Plan::decode(b"{\"spec\": 1}", Path::new("x.json")).unwrap_err();
        assert!(matches!(e, PlanError::NotAPlan { .. }));
        assert!(e.to_string().contains("x.json"));
        let e = Plan::read(Path::new("/nonexistent/dir/p.plan")).unwrap_err();
        assert!(matches!(e, PlanError::Io { action: "read", .. }));
        assert!(e.to_string().contains("/nonexistent/dir/p.plan"));
    }

    /// A file with a well-formed header around `payload`.
    fn wrap(payload: &[u8]) -> Vec<u8> {
        let mut b = PLAN_MAGIC.to_vec();
        b.extend_from_slice(&PLAN_FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&Sha256::digest(payload));
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn a_payload_of_another_shape_is_a_decode_error() {
        let mut payload = Vec::new();
        ciborium::into_writer(&("not", "a plan"), &mut payload).unwrap();
        let e = Plan::decode(&wrap(&payload), Path::new("p.plan")).unwrap_err();
        assert!(matches!(e, PlanError::Decode { .. }), "{e}");
    }

    #[test]
    fn invalid_schedules_are_refused_on_read_and_write() {
        fn reverse(p: &mut Program) {
            p.schedule.reverse();
        }
        fn add_missing(p: &mut Program) {
            p.schedule.push(NodeId::new(999));
        }
        fn repeat_first(p: &mut Program) {
            let first = p.schedule[0];
            p.schedule.push(first);
        }
        fn drop_last(p: &mut Program) {
            p.schedule.pop();
        }
        type Spoil = fn(&mut Program);
        let cases: [(&str, Spoil); 4] = [
            ("not a topological order", reverse),
            ("not in the graph", add_missing),
            ("twice", repeat_first),
            ("is not scheduled", drop_last),
        ];
        let dir = temp_dir("invalid");
        let path = dir.join("bad.plan");
        for (what, spoil) in cases {
            let mut p = plan();
            spoil(&mut p.programs[1]);
            let e = Plan::decode(&p.encode().unwrap(), &path).unwrap_err();
            match &e {
                PlanError::Invalid { problem, .. } => {
                    assert_eq!(problem.program, "logprobs");
                    assert!(problem.reason.contains(what), "{what}: {e}");
                }
                other => panic!("{what}: {other}"),
            }
            assert!(matches!(p.write(&path), Err(PlanError::Invalid { .. })));
            assert!(!path.exists());
        }
        let mut p = plan();
        p.programs[1].kind = ProgramKind::MetaStep;
        assert!(p.validate().unwrap_err().reason.contains("two programs"));
        let mut p = plan();
        p.programs.remove(2);
        let e = p.validate().unwrap_err();
        assert_eq!(e.program, "decode_step");
        assert!(e.reason.contains("no such program"));
        let mut p = plan();
        p.programs[1].signature.inputs.pop();
        let e = p.validate().unwrap_err();
        assert!(
            e.reason.contains("input `b` is not in the signature"),
            "{e}"
        );
        let mut p = plan();
        p.programs[1].signature.outputs[0].ty = crate::TensorType::new(DType::F32, vec![3, 5]);
        let e = p.validate().unwrap_err();
        assert!(e.reason.contains("does not match the signature"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_pipeline_makes_the_plan_stale() {
        let p = plan();
        assert!(p.check_fresh("[model]\nd_model = 16\n").is_ok());
        let e = p.check_fresh("[model]\nd_model = 32\n").unwrap_err();
        match &e {
            PlanError::Stale {
                plan_hash,
                pipeline_hash: now,
            } => {
                assert_eq!(plan_hash, &p.pipeline_hash);
                assert_eq!(now, &pipeline_hash("[model]\nd_model = 32\n"));
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("coopc compile"));
    }

    #[test]
    fn write_replaces_an_existing_file() {
        let dir = temp_dir("replace");
        let path = dir.join("p.plan");
        std::fs::write(&path, b"old contents").unwrap();
        plan().write(&path).unwrap();
        assert!(Plan::read(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! coopc training: runs a compiled plan on a backend. The trainer feeds the
//! meta-step (its SFT demonstrations and the RL rollouts the sampler draws
//! with the plan's decode step, scored by the plan's log-prob program and
//! the task's verifier), adopts the next state the signature names, writes
//! `metrics.jsonl`, evaluates held-out problems and writes checkpoints that
//! `--resume` continues bit-exactly; TensorBoard event files beside the
//! metrics (`tensorboard`). It reads programs and their interfaces
//! from the plan and never builds, schedules or fuses a graph: it does not
//! depend on the compiler.

pub mod checkpoint;
pub mod export;
pub mod init;
pub mod interrupt;
pub mod sampler;
pub mod tasks;
pub mod tensorboard;
pub mod train;

pub use train::{Metrics, RunOptions, TrainError, Trainer};

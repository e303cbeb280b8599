//! coopc: pipeline.toml → plan → training. The binary is argument parsing
//! over this library: [`cli`] holds one module per command. The stages are
//! crates of their own — `coopc_ir` (IR, spec, kernel IR, plan format),
//! `coopc_compiler` (spec → plan), `coopc_runtime` (the Backend trait and
//! the CPU executor), `coopc_kernels` (CubeCL kernels and the device
//! executor), `coopc_train` (trainer, sampler, tasks, checkpoints) — see
//! docs/architecture.md.

pub mod cli;
#[cfg(feature = "mpi")]
pub mod mpi_world;

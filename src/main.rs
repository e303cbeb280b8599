//! The `coopc` binary: sets up the process (SIGPIPE, the allocator, the
//! executor's thread pool) and runs the command line of `coopc::cli`.

use clap::Parser;
use coopc::cli::{dispatch, Cli};

/// Output into a closed pipe (`coopc inspect PLAN | head`) ends the
/// process quietly, as it does for other command-line tools, instead of a
/// panic in `println!` (Rust ignores SIGPIPE by default).
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: restoring a signal's default disposition at the start of
    // `main`, before any other thread exists, has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The allocator keeps freed buffers of up to 32 MiB for reuse instead of
/// handing each back to the kernel and faulting it in again on the next
/// allocation (glibc's default trims and unmaps eagerly): a CPU meta-step
/// allocates and frees thousands of such buffers. Larger buffers are still
/// mapped and unmapped one by one, going back to the system when freed.
/// One arena for all threads: buffers the pool's other threads free go back
/// to the one the executor allocates from (with an arena per thread they
/// were kept apart, and a cpu-large meta-step's peak RSS grew from 340 to
/// 390–510 MiB once row-wise kernels ran on both threads). Settings a user
/// gives through `GLIBC_TUNABLES` are left as they are.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; called at the start
    // of `main`, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() {
    #[cfg(unix)]
    default_sigpipe();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_allocator();
    let cli = Cli::parse();
    let processes = match coopc::cli::start_processes() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    // The command runs on a thread of the pool the CPU executor's parallel
    // loops use, so that it takes part in them instead of handing each
    // loop to the pool and waiting (12 % of a CPU meta-step on 2 cores).
    // The pool takes its size from RAYON_NUM_THREADS, else the cores.
    let code = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| dispatch(cli)),
        Err(_) => dispatch(cli),
    };
    let world = coopc_runtime::collective::current();
    if code != 0 && world.world() > 1 {
        // The other processes may be waiting for this one in a collective.
        world.abort(&format!("stopped with exit status {code}"));
    }
    drop(processes);
    std::process::exit(code);
}

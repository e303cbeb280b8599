//! The collective of a run started by an MPI launcher (`mpirun -np N coopc
//! run …`, Slurm's `srun --mpi=pmix`), over the system's MPI library.
//! Built with `--features mpi`.
//!
//! Sums are reduced to rank 0 and broadcast from it, so every rank gets the
//! same bits (an all-reduce may round differently on different ranks);
//! calls are serialised through a lock (MPI is initialised for
//! `MPI_THREAD_SERIALIZED`). A rank that fails calls `MPI_Abort`, which
//! ends every process of the job, the launcher naming the rank.

use std::sync::Mutex;

use coopc_runtime::collective::{Collective, CollectiveError};
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

pub struct MpiWorld {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    world: usize,
}

// SAFETY: every MPI call goes through `comm`'s lock, one thread at a time,
// which MPI_THREAD_SERIALIZED allows from any thread.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    /// Initialises MPI: the universe (MPI is finalised when it is dropped,
    /// which must happen before the process exits) and the world's
    /// collective. Fails where MPI was initialised already or the library
    /// refuses the threading level.
    pub fn init() -> Result<(Universe, MpiWorld), String> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or("MPI was initialised already")?;
        if level < Threading::Serialized {
            return Err(format!(
                "the MPI library offers threading level {level:?}; coopc needs Serialized"
            ));
        }
        let comm = universe.world();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        let world = MpiWorld {
            comm: Mutex::new(comm),
            rank,
            world,
        };
        Ok((universe, world))
    }

    fn sum<T: Copy + Default + mpi::datatype::Equivalence>(&self, buf: &mut [T]) {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let root = comm.process_at_rank(0);
        if self.rank == 0 {
            let mut out = vec![T::default(); buf.len()];
            root.reduce_into_root(&buf[..], &mut out[..], SystemOperation::sum());
            buf.copy_from_slice(&out);
        } else {
            root.reduce_into(&buf[..], SystemOperation::sum());
        }
        root.broadcast_into(buf);
    }
}

impl Collective for MpiWorld {
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.sum(buf);
        Ok(())
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.sum(buf);
        Ok(())
    }
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let p = comm.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        p.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        p.broadcast_into(&mut buf[..]);
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.comm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .barrier();
        Ok(())
    }
    fn abort(&self, reason: &str) {
        eprintln!("coopc: rank {} of {}: {reason}", self.rank, self.world);
        // Not through the lock: another thread may hold it inside a
        // collective that will never complete.
        SimpleCommunicator::world().abort(1);
    }
}

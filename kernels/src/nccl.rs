//! NCCL: the collective of data-parallel runs on NVIDIA GPUs, one process
//! per GPU.
//!
//! [`NcclComm`] is a communicator over the run's processes. The device
//! executor sums its `AllReduceSum` nodes with it in device memory
//! ([`Device::attach_nccl`](crate::device::Device::attach_nccl)), with no
//! copy through the host. It also implements the process-level
//! [`Collective`] (sums of host buffers, broadcast, barrier) by staging
//! through device memory, for runs started without MPI.
//!
//! The communicator's unique id is made by rank 0 and reaches the others
//! either over a collective the run already has ([`unique_id_over`], MPI)
//! or through a file on a file system every process sees
//! ([`unique_id_via_file`], `COOPC_NCCL_RENDEZVOUS`).
//!
//! The library (`libnccl.so.2`) is loaded when first used: coopc builds and
//! runs without it, and [`NcclComm::new`] says so when it is missing.
//!
//! NCCL sums in its own order (a ring or a tree, chosen by the library for
//! the machine), not in rank order as the MPI and thread collectives do,
//! but every rank receives the same bits, so replicated parameters stay
//! equal across ranks.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use coopc_runtime::collective::{Collective, CollectiveError};
use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut, DeviceRepr};
use cudarc::nccl::{result as nccl, sys};

/// Bytes in an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// Whether the NCCL library loads on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: loading the library runs its initialisers, which have no
    // preconditions.
    unsafe { sys::is_culib_present() }
}

fn require_nccl() -> Result<(), CollectiveError> {
    if nccl_present() {
        Ok(())
    } else {
        Err(CollectiveError::Library(
            "the NCCL library (libnccl.so.2) was not found: install NCCL (e.g. the \
             libnccl2 package, or the one PyTorch's wheels bring, on LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

fn nccl_error(what: &str, e: nccl::NcclError) -> CollectiveError {
    CollectiveError::Library(format!("NCCL {what} failed: {e:?}"))
}

fn cuda_error(what: &str, e: cudarc::driver::DriverError) -> CollectiveError {
    CollectiveError::Library(format!("CUDA {what} failed for NCCL: {e}"))
}

/// A new NCCL unique id (made by rank 0), as bytes.
pub fn new_unique_id() -> Result<Vec<u8>, CollectiveError> {
    require_nccl()?;
    let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn id_from_bytes(bytes: &[u8]) -> Result<sys::ncclUniqueId, CollectiveError> {
    if bytes.len() != ID_BYTES {
        return Err(CollectiveError::Library(format!(
            "an NCCL unique id has {ID_BYTES} bytes, got {}",
            bytes.len()
        )));
    }
    let mut id = sys::ncclUniqueId {
        internal: [0; ID_BYTES],
    };
    for (d, &b) in id.internal.iter_mut().zip(bytes) {
        *d = b as _;
    }
    Ok(id)
}

/// Rank 0 makes the id with `make` and broadcasts it over `over` (the run's
/// MPI world). When rank 0 cannot make one, every rank fails, not only it.
pub fn unique_id_over(
    over: &dyn Collective,
    make: impl FnOnce() -> Result<Vec<u8>, CollectiveError>,
) -> Result<Vec<u8>, CollectiveError> {
    let (mut buf, failure) = if over.rank() == 0 {
        match make() {
            Ok(id) => (id, None),
            // An empty id tells the others rank 0 failed.
            Err(e) => (Vec::new(), Some(e)),
        }
    } else {
        (Vec::new(), None)
    };
    over.broadcast(0, &mut buf)?;
    if let Some(e) = failure {
        return Err(e);
    }
    if buf.len() != ID_BYTES {
        return Err(CollectiveError::PeerFailed {
            rank: 0,
            world: over.world(),
            reason: "it could not make an NCCL unique id".into(),
        });
    }
    Ok(buf)
}

/// The id through the file `path` on a file system all ranks see: rank 0
/// makes it with `make` and writes it (to a temporary name, then renamed,
/// so a reader never sees part of it); the others wait up to `timeout` for
/// the file. Rank 0 refuses a file that already exists (left by an earlier
/// run that failed): an old id would send the others to a dead rank 0.
/// [`NcclComm::from_file`] removes the file once every rank has joined.
pub fn unique_id_via_file(
    path: &Path,
    rank: usize,
    timeout: Duration,
    make: impl FnOnce() -> Result<Vec<u8>, CollectiveError>,
) -> Result<Vec<u8>, CollectiveError> {
    let io = |what: &str, e: std::io::Error| {
        CollectiveError::Library(format!(
            "NCCL rendezvous file {}: {what}: {e}",
            path.display()
        ))
    };
    if rank == 0 {
        if path.exists() {
            return Err(CollectiveError::Library(format!(
                "NCCL rendezvous file {} already exists (left by an earlier run?): remove it, \
                 or give COOPC_NCCL_RENDEZVOUS a new path",
                path.display()
            )));
        }
        let id = make()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, &id).map_err(|e| io("cannot write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("cannot rename into place", e))?;
        return Ok(id);
    }
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == ID_BYTES => return Ok(bytes),
            Ok(bytes) => {
                return Err(CollectiveError::Library(format!(
                    "NCCL rendezvous file {} holds {} bytes, not an id of {ID_BYTES}",
                    path.display(),
                    bytes.len()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot read", e)),
        }
        if start.elapsed() >= timeout {
            return Err(CollectiveError::Library(format!(
                "rank {rank} waited {:.1} s for rank 0 to write the NCCL id to {} \
                 (COOPC_NCCL_TIMEOUT sets the wait in seconds)",
                timeout.as_secs_f64(),
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The raw communicator; NCCL's calls on one communicator must not
/// overlap, so it sits behind [`NcclComm`]'s lock.
struct Raw(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a
// time, which the mutex around it ensures.
unsafe impl Send for Raw {}

/// An NCCL communicator of `world` processes, this one `rank`, on CUDA
/// device `ordinal` (the device the run's executor uses: the same primary
/// context, so pointers of CubeCL's buffers are valid here).
pub struct NcclComm {
    raw: Mutex<Raw>,
    ctx: Arc<CudaContext>,
    /// The stream NCCL's kernels run on; every operation waits for it.
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    ordinal: usize,
}

impl NcclComm {
    /// Joins the communicator with unique id `id` (every rank passes the
    /// same). Blocks until all `world` ranks have joined.
    pub fn new(
        id: &[u8],
        rank: usize,
        world: usize,
        ordinal: usize,
    ) -> Result<Self, CollectiveError> {
        require_nccl()?;
        let id = id_from_bytes(id)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error("opening the device", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_error("making a stream", e))?;
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful ncclCommInitRank; the
        // id is NCCL's 128 bytes; the device's context is current.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        Ok(NcclComm {
            raw: Mutex::new(Raw(comm)),
            ctx,
            stream,
            rank,
            world,
            ordinal,
        })
    }

    /// Joins with the id from the rendezvous file `path` (see
    /// [`unique_id_via_file`]); rank 0 removes the file once all have
    /// joined.
    pub fn from_file(
        path: &Path,
        rank: usize,
        world: usize,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        require_nccl()?;
        let id = unique_id_via_file(path, rank, timeout, new_unique_id)?;
        let comm = Self::new(&id, rank, world, ordinal)?;
        if rank == 0 {
            // Every rank has read it: ncclCommInitRank returned.
            let _ = std::fs::remove_file(path);
        }
        Ok(comm)
    }

    /// The CUDA device the communicator is on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `dst ← Σ_ranks src` over `count` elements of `dtype` at device
    /// addresses of this communicator's device; returns once the sum is in
    /// `dst`.
    ///
    /// # Safety
    /// `src` and `dst` must be valid device buffers of at least `count`
    /// elements that no other work writes meanwhile, and every write to
    /// `src` must have finished.
    pub unsafe fn sum_device(
        &self,
        src: u64,
        dst: u64,
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CollectiveError> {
        self.on_stream("ncclAllReduce", |comm, stream| {
            // SAFETY: the caller's contract on `src` and `dst`.
            unsafe {
                nccl::all_reduce(
                    src as *const _,
                    dst as *mut _,
                    count,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Runs the NCCL call `what` (`call(comm, stream)`) on the
    /// communicator, one call at a time with the device's context current,
    /// and waits for it to finish.
    fn on_stream(
        &self,
        what: &str,
        call: impl FnOnce(
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CollectiveError> {
        let raw = self.raw.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        call(raw.0, self.stream.cu_stream() as _).map_err(|e| nccl_error(what, e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error(&format!("waiting for {what}"), e))
    }

    /// `buf` copied to device memory, replaced there by `op(address)`, and
    /// copied back.
    fn staged<T: DeviceRepr + Copy>(
        &self,
        buf: &mut [T],
        op: impl FnOnce(u64) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the context", e))?;
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| cuda_error("copying in", e))?;
        {
            let (ptr, _sync) = dev.device_ptr_mut(&self.stream);
            self.stream
                .synchronize()
                .map_err(|e| cuda_error("copying in", e))?;
            op(ptr)?;
        }
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| cuda_error("copying out", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("copying out", e))
    }

    /// A host buffer summed through device memory.
    fn sum_host<T: DeviceRepr + Copy>(
        &self,
        buf: &mut [T],
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CollectiveError> {
        let count = buf.len();
        // SAFETY: the staged buffer holds `count` elements, copied in and
        // synchronised.
        self.staged(buf, |ptr| unsafe {
            self.sum_device(ptr, ptr, count, dtype)
        })
    }

    /// `buf` replaced by rank `root`'s (of the same length), through
    /// device memory.
    fn broadcast_bytes(&self, root: usize, buf: &mut [u8]) -> Result<(), CollectiveError> {
        let count = buf.len();
        self.staged(buf, |ptr| {
            self.on_stream("ncclBroadcast", |comm, stream| {
                // SAFETY: the staged buffer holds `count` bytes, copied in
                // and synchronised.
                unsafe {
                    nccl::broadcast(
                        ptr as *const _,
                        ptr as *mut _,
                        count,
                        sys::ncclDataType_t::ncclUint8,
                        root as i32,
                        comm,
                        stream,
                    )
                }
            })
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let raw = self.raw.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the communicator was made by ncclCommInitRank and is not
        // used again.
        unsafe {
            let _ = nccl::comm_destroy(raw.0);
        }
    }
}

impl Collective for NcclComm {
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        self.sum_host(buf, sys::ncclDataType_t::ncclFloat64)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.sum_host(buf, sys::ncclDataType_t::ncclFloat32)
    }
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), CollectiveError> {
        // The length first, then the bytes.
        let mut len = (buf.len() as u64).to_le_bytes();
        self.broadcast_bytes(root, &mut len)?;
        buf.resize(u64::from_le_bytes(len) as usize, 0);
        if buf.is_empty() {
            return Ok(());
        }
        self.broadcast_bytes(root, buf)
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.sum_host(&mut [0f32], sys::ncclDataType_t::ncclFloat32)
    }
    fn abort(&self, _reason: &str) {
        // Ends this rank's part in every pending and future operation; the
        // others' operations then fail or are ended by the launcher.
        if let Ok(raw) = self.raw.try_lock() {
            // SAFETY: the communicator is valid; it is destroyed here and
            // the process exits after `abort`.
            unsafe {
                let _ = nccl::comm_abort(raw.0);
            }
        }
    }
}

impl crate::device::DeviceSum<cubecl::cuda::CudaRuntime> for NcclComm {
    fn sum(
        &self,
        client: &cubecl::prelude::ComputeClient<cubecl::cuda::CudaRuntime>,
        src: &cubecl::server::Handle,
        dst: &cubecl::server::Handle,
        numel: usize,
    ) -> Result<(), CollectiveError> {
        let device = |what: &str, e: String| CollectiveError::Library(format!("{what}: {e}"));
        // The kernels that write `src` run on CubeCL's stream: wait for them.
        cubecl::future::block_on(client.sync())
            .map_err(|e| device("waiting for the device", format!("{e:?}")))?;
        let s = client
            .get_resource(src.clone())
            .map_err(|e| device("the summed buffer", format!("{e:?}")))?;
        let d = client
            .get_resource(dst.clone())
            .map_err(|e| device("the sum's buffer", format!("{e:?}")))?;
        // SAFETY: both are f32 buffers of `numel` elements on this device
        // (the executor's operand and output); CubeCL's stream is idle, and
        // the sum has finished when this returns.
        unsafe {
            self.sum_device(
                s.resource().ptr,
                d.resource().ptr,
                numel,
                sys::ncclDataType_t::ncclFloat32,
            )
        }
    }
}

/// The communicator the process's collective is built on when the run
/// was started without MPI ([`install_process_comm`]); the device executor
/// sums through it.
static PROCESS_COMM: OnceLock<Arc<NcclComm>> = OnceLock::new();

/// Makes `comm` the process's collective (for the trainer's host sums) and
/// the communicator [`process_comm`] returns; false when the process has
/// a collective already.
pub fn install_process_comm(comm: Arc<NcclComm>) -> bool {
    coopc_runtime::collective::install(comm.clone()) && PROCESS_COMM.set(comm).is_ok()
}

/// The communicator [`install_process_comm`] installed, if any.
pub fn process_comm() -> Option<Arc<NcclComm>> {
    PROCESS_COMM.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use coopc_runtime::collective::ThreadGroup;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("coopc-nccl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("id")
    }

    fn fake_id(seed: u8) -> Vec<u8> {
        (0..ID_BYTES as u32)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect()
    }

    #[test]
    fn the_file_rendezvous_gives_every_rank_rank_zeros_id() {
        let path = tmp("file");
        let ids: Vec<Vec<u8>> = std::thread::scope(|s| {
            // The readers start first and wait for the file.
            let handles: Vec<_> = (0..4)
                .rev()
                .map(|rank| {
                    let path = path.clone();
                    s.spawn(move || {
                        if rank == 0 {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        unique_id_via_file(&path, rank, Duration::from_secs(20), || Ok(fake_id(7)))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert!(
            ids.iter().all(|id| *id == fake_id(7)),
            "every rank reads rank 0's id"
        );
        // No temporary file is left beside it.
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn rank_zero_refuses_a_file_left_by_an_earlier_run() {
        let path = tmp("stale");
        std::fs::write(&path, fake_id(3)).unwrap();
        let e =
            unique_id_via_file(&path, 0, Duration::from_secs(1), || Ok(fake_id(5))).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("already exists") && msg.contains(&path.display().to_string()),
            "{msg}"
        );
        // The old id is left as it was.
        assert_eq!(std::fs::read(&path).unwrap(), fake_id(3));
    }

    #[test]
    fn a_rank_waiting_for_a_missing_file_times_out_naming_rank_zero() {
        let path = tmp("missing");
        let e = unique_id_via_file(&path, 2, Duration::from_millis(200), || unreachable!())
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("rank 2 waited 0.2 s for rank 0")
                && msg.contains(&path.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn a_truncated_id_file_is_an_error_not_an_id() {
        let path = tmp("short");
        std::fs::write(&path, [1u8; 20]).unwrap();
        let e =
            unique_id_via_file(&path, 1, Duration::from_secs(1), || unreachable!()).unwrap_err();
        assert!(e.to_string().contains("holds 20 bytes"), "{e}");
    }

    #[test]
    fn the_id_is_broadcast_over_the_runs_collective() {
        let group = ThreadGroup::new(3, Duration::from_secs(20));
        let ids: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|c| s.spawn(move || unique_id_over(&c, || Ok(fake_id(11)))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == fake_id(11)));
    }

    #[test]
    fn every_rank_fails_when_rank_zero_cannot_make_an_id() {
        let group = ThreadGroup::new(2, Duration::from_secs(20));
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        unique_id_over(&c, || Err(CollectiveError::Library("no NCCL here".into())))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0].as_ref().unwrap_err().to_string(), "no NCCL here");
        let other = results[1].as_ref().unwrap_err().to_string();
        assert!(
            other.contains("rank 0") && other.contains("NCCL unique id"),
            "{other}"
        );
    }

    #[test]
    fn ids_round_trip_through_nccls_type() {
        let id = id_from_bytes(&fake_id(13)).unwrap();
        let back: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        assert_eq!(back, fake_id(13));
        assert!(id_from_bytes(&[0; 100])
            .unwrap_err()
            .to_string()
            .contains("got 100"));
    }

    #[test]
    fn without_the_library_joining_says_what_is_missing() {
        if nccl_present() {
            // A machine with NCCL: the GPU suite (tests/device_kernels.rs)
            // checks the communicator itself.
            assert_eq!(new_unique_id().unwrap().len(), ID_BYTES);
            return;
        }
        for e in [
            NcclComm::new(&fake_id(1), 0, 1, 0).err().unwrap(),
            new_unique_id().unwrap_err(),
        ] {
            assert!(e.to_string().contains("libnccl.so.2"), "{e}");
        }
    }
}

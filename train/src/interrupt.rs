//! A request to stop training early (SIGINT, SIGTERM): recorded here by
//! whoever catches the signal, read by the training loop after each
//! meta-step, which then writes a checkpoint and returns
//! [`crate::TrainError::Interrupted`].

use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Asks the running training loop to stop after its current meta-step.
/// `signal` is the signal's number (0 is ignored). An atomic store only, so
/// it may be called from a signal handler.
pub fn request(signal: i32) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// The signal whose stop was requested, if any.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Forgets a request (a new run in the same process starts without one).
pub fn clear() {
    SIGNAL.store(0, Ordering::SeqCst);
}

/// The conventional name of a signal number, for messages.
pub fn signal_name(signal: i32) -> String {
    match signal {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

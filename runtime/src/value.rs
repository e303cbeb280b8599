//! Values a backend holds between program calls: host tensors, or buffers
//! resident in a device's memory. A trainer keeps its state as values, so
//! on a device backend θ, w, the optimiser state and the KV cache stay on
//! the device from one call to the next and only what the host needs
//! (losses, logits for sampling) is read back.

use crate::tensor::HostTensor;
use coopc_ir::TensorType;
use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// A tensor held by a backend.
#[derive(Clone, Debug)]
pub enum Value {
    /// In host memory (shared: cloning a value never copies its data).
    Host(Arc<HostTensor>),
    /// In a device's memory.
    Device(DeviceTensor),
}

impl Value {
    pub fn host(t: HostTensor) -> Value {
        Value::Host(Arc::new(t))
    }

    pub fn ty(&self) -> TensorType {
        match self {
            Value::Host(t) => t.ty(),
            Value::Device(d) => d.ty.clone(),
        }
    }

    /// The host tensor, when the value is on the host.
    pub fn as_host(&self) -> Option<&HostTensor> {
        match self {
            Value::Host(t) => Some(t),
            Value::Device(_) => None,
        }
    }

    /// Whether the value lives in a device's memory.
    pub fn is_resident(&self) -> bool {
        matches!(self, Value::Device(_))
    }
}

impl From<HostTensor> for Value {
    fn from(t: HostTensor) -> Value {
        Value::host(t)
    }
}

/// A buffer in a device's memory, with the graph type it holds. The handle
/// is opaque here; the backend that made it downcasts it.
#[derive(Clone)]
pub struct DeviceTensor {
    pub ty: TensorType,
    /// The backend that owns the buffer, as `--backend` spells it.
    pub backend: &'static str,
    pub handle: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceTensor({} on {})", self.ty, self.backend)
    }
}

/// One graph input as an executor sees it.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    Host(&'a HostTensor),
    Device(&'a DeviceTensor),
}

/// Where a graph's inputs come from, by name.
pub trait Inputs {
    fn input(&self, name: &str) -> Option<Input<'_>>;
}

impl Inputs for HashMap<String, HostTensor> {
    fn input(&self, name: &str) -> Option<Input<'_>> {
        self.get(name).map(Input::Host)
    }
}

impl Inputs for HashMap<String, Value> {
    fn input(&self, name: &str) -> Option<Input<'_>> {
        self.get(name).map(|v| match v {
            Value::Host(t) => Input::Host(t),
            Value::Device(d) => Input::Device(d),
        })
    }
}

/// Bytes a backend has copied between host and device since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host → device.
    pub uploaded: u64,
    /// Device → host.
    pub downloaded: u64,
}

impl Transfers {
    /// The traffic between an earlier reading and this one.
    pub fn since(self, earlier: Transfers) -> Transfers {
        Transfers {
            uploaded: self.uploaded - earlier.uploaded,
            downloaded: self.downloaded - earlier.downloaded,
        }
    }
}

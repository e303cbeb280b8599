//! The input and output files, as `coopc grad` reads and writes them
//! (docs/cli.md): P strict (a missing or an unexpected tensor is an error
//! naming it), B by the `sft.*` / `rl.*` names with optional `step{k}.`
//! prefixes, G with one tensor per output in the pipeline's dtype.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::meta::{Named, Outputs};
use crate::model::Batch;
use crate::spec::{Dtype, Spec};

const BATCH_KEYS: [&str; 6] = [
    "sft.input_ids",
    "sft.loss_mask",
    "rl.input_ids",
    "rl.loss_mask",
    "rl.advantages",
    "rl.old_logprobs",
];

/// A tensor of a safetensors file as f64 values and its shape.
struct Host {
    shape: Vec<usize>,
    values: Vec<f64>,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn host_of(st: &SafeTensors, name: &str, file: &Path) -> Result<Host> {
    let v = st
        .tensor(name)
        .map_err(|e| anyhow!("{}: `{name}`: {e}", file.display()))?;
    let b = v.data();
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            b.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect()
        };
    }
    let values: Vec<f64> = match v.dtype() {
        StDtype::F32 => conv!(f32, 4),
        StDtype::F64 => conv!(f64, 8),
        StDtype::I64 => conv!(i64, 8),
        StDtype::I32 => conv!(i32, 4),
        StDtype::U32 => conv!(u32, 4),
        StDtype::I16 => conv!(i16, 2),
        StDtype::U16 => conv!(u16, 2),
        StDtype::U8 => b.iter().map(|&x| x as f64).collect(),
        StDtype::I8 => b.iter().map(|&x| x as i8 as f64).collect(),
        other => bail!(
            "{}: `{name}` has dtype {other:?}, which this peer does not read",
            file.display()
        ),
    };
    Ok(Host {
        shape: v.shape().to_vec(),
        values,
    })
}

fn float2<B: Backend>(h: &Host, device: &B::Device) -> Tensor<B, 2> {
    let shape = match h.shape.as_slice() {
        [n] => [1, *n],
        [r, c] => [*r, *c],
        [] => [1, 1],
        s => unreachable!("rank-{} parameter", s.len()),
    };
    Tensor::from_data(
        TensorData::new(h.values.clone(), shape).convert::<B::FloatElem>(),
        device,
    )
}

/// θ, w and (when P has `shadow.*`) the persistent shadow's start.
#[allow(clippy::type_complexity)]
pub fn load_params<B: AutodiffBackend>(
    spec: &Spec,
    path: &Path,
    device: &B::Device,
) -> Result<(Named<B>, Named<B>, Option<Named<B>>)> {
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let what = format!("parameter file {}", path.display());
    let names = st.names();
    let has_shadow = names.iter().any(|n| n.starts_with("shadow."));
    let theta_shapes = spec.theta_shapes();
    let lora_shapes = spec.lora_shapes();
    let mut expected: Vec<(String, Vec<usize>)> = theta_shapes.clone();
    expected.extend(lora_shapes.iter().cloned());
    if has_shadow {
        expected.extend(
            theta_shapes
                .iter()
                .map(|(n, s)| (format!("shadow.{n}"), s.clone())),
        );
    }
    let inner_device = device.clone();
    let mut loaded: HashMap<String, Tensor<B::InnerBackend, 2>> = HashMap::new();
    for (n, shape) in &expected {
        if !names.contains(&n.as_str()) {
            bail!("{what}: missing tensor `{n}`");
        }
        let dtype = st.tensor(n).map(|v| v.dtype()).ok();
        if !matches!(dtype, Some(StDtype::F32 | StDtype::F64)) {
            bail!("{what}: `{n}` has dtype {dtype:?}; f32 or f64 expected");
        }
        let h = host_of(&st, n, path)?;
        if &h.shape != shape {
            bail!("{what}: `{n}` has shape {:?}, expected {shape:?}", h.shape);
        }
        loaded.insert(n.clone(), float2::<B::InnerBackend>(&h, &inner_device));
    }
    let mut extra: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !expected.iter().any(|(e, _)| e == n))
        .collect();
    extra.sort();
    if let Some(n) = extra.first() {
        bail!("{what}: unexpected tensor `{n}`");
    }
    if has_shadow && !spec.shadow_persistent && spec.bridge() {
        eprintln!(
            "note: bilevel.shadow = \"one_step\" starts θ̂ from θ; the shadow.* tensors of {} are not used",
            path.display()
        );
    }
    let mut take = |prefix: &str, list: &[(String, Vec<usize>)]| -> Named<B> {
        list.iter()
            .map(|(n, _)| {
                let t = loaded.remove(&format!("{prefix}{n}")).expect("loaded above");
                (n.clone(), t)
            })
            .collect()
    };
    let theta = take("", &theta_shapes);
    let w = take("", &lora_shapes);
    let shadow = has_shadow.then(|| take("shadow.", &theta_shapes));
    Ok((theta, w, shadow))
}

/// The K step batches (docs/semantics.md §3.3).
pub fn load_batches<B: AutodiffBackend>(
    spec: &Spec,
    path: &Path,
    device: &B::Device,
) -> Result<Vec<Batch<B>>> {
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let names = st.names();
    let prefixed = names.iter().any(|k| {
        k.strip_prefix("step")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(d, _)| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
    });
    let mut keys: Vec<&str> = BATCH_KEYS.to_vec();
    if spec.kl_coef > 0.0 {
        keys.push("rl.ref_logprobs");
    }
    let mut out = Vec::with_capacity(spec.unroll);
    for k in 0..spec.unroll {
        let mut got: HashMap<&str, Host> = HashMap::new();
        for key in &keys {
            let src = if prefixed {
                format!("step{k}.{key}")
            } else {
                key.to_string()
            };
            if !names.contains(&src.as_str()) {
                bail!("{}: missing tensor `{src}`", path.display());
            }
            got.insert(key, host_of(&st, &src, path)?);
        }
        let dims2 = |key: &str| -> Result<[usize; 2]> {
            match got[key].shape.as_slice() {
                [r, c] => Ok([*r, *c]),
                s => bail!("{}: `{key}` has shape {s:?}; [rows, T] expected", path.display()),
            }
        };
        let [bs, ts] = dims2("sft.input_ids")?;
        let [br, tr] = dims2("rl.input_ids")?;
        for (key, want) in [
            ("sft.loss_mask", [bs, ts]),
            ("rl.loss_mask", [br, tr]),
            ("rl.old_logprobs", [br, tr]),
            ("rl.ref_logprobs", [br, tr]),
        ] {
            if got.contains_key(key) && dims2(key)? != want {
                bail!("{}: `{key}` has shape {:?}, expected {want:?}", path.display(), got[key].shape);
            }
        }
        if got["rl.advantages"].shape != [br] {
            bail!(
                "{}: `rl.advantages` has shape {:?}, expected [{br}]",
                path.display(),
                got["rl.advantages"].shape
            );
        }
        for t in [ts, tr] {
            if t < 2 || t > spec.max_seq {
                bail!(
                    "{}: sequences of {t} tokens; 2 to model.max_seq = {} expected",
                    path.display(),
                    spec.max_seq
                );
            }
        }
        for (key, t) in [("sft.loss_mask", ts), ("rl.loss_mask", tr)] {
            if got[key].values.iter().step_by(t).any(|&x| x != 0.0) {
                bail!(
                    "{}: `{key}`[:, 0] must be 0 (position 0 has no log-probability)",
                    path.display()
                );
            }
        }
        for key in ["sft.input_ids", "rl.input_ids"] {
            if let Some(&bad) = got[key]
                .values
                .iter()
                .find(|&&x| x < 0.0 || x >= spec.vocab_size as f64 || x.fract() != 0.0)
            {
                bail!(
                    "{}: `{key}` holds {bad}, outside the vocabulary 0..{}",
                    path.display(),
                    spec.vocab_size
                );
            }
        }
        let ids = |key: &str, shape: [usize; 2]| -> Tensor<B, 2, Int> {
            let v: Vec<i64> = got[key].values.iter().map(|&x| x as i64).collect();
            Tensor::from_data(TensorData::new(v, shape).convert::<B::IntElem>(), device)
        };
        let float = |key: &str, shape: [usize; 2]| -> Tensor<B, 2> {
            Tensor::from_data(
                TensorData::new(got[key].values.clone(), shape).convert::<B::FloatElem>(),
                device,
            )
        };
        out.push(Batch {
            sft_ids: ids("sft.input_ids", [bs, ts]),
            sft_mask: float("sft.loss_mask", [bs, ts]),
            sft_mask_sum: got["sft.loss_mask"].values.iter().sum(),
            rl_ids: ids("rl.input_ids", [br, tr]),
            rl_mask: float("rl.loss_mask", [br, tr]),
            rl_advantages: float("rl.advantages", [br, 1]),
            rl_old_logprobs: float("rl.old_logprobs", [br, tr]),
            rl_ref_logprobs: got
                .contains_key("rl.ref_logprobs")
                .then(|| float("rl.ref_logprobs", [br, tr])),
        });
    }
    Ok(out)
}

/// The outputs as f64 values (tensors are already in host memory on ndarray).
pub fn to_host<B: AutodiffBackend>(out: &Outputs<B>) -> Vec<(String, Vec<f64>)> {
    out.iter()
        .map(|(n, t)| {
            let v = t
                .to_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .expect("converted to f64");
            (n.clone(), v)
        })
        .collect()
}

/// Writes G with the shapes `coopc grad` gives: scalars for `loss.*`, the
/// parameter's shape for `lower.*`, `theta_K.*` and `hyper.*`.
pub fn write_outputs(
    spec: &Spec,
    path: &Path,
    host: &[(String, Vec<f64>)],
    dtype: Dtype,
) -> Result<()> {
    let shapes: HashMap<String, Vec<usize>> = spec
        .theta_shapes()
        .into_iter()
        .chain(spec.lora_shapes())
        .collect();
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(host.len());
    for (n, v) in host {
        let shape = if n.starts_with("loss.") {
            vec![]
        } else {
            let base = n.split_once('.').map(|(_, b)| b).unwrap_or(n);
            shapes
                .get(base)
                .cloned()
                .ok_or_else(|| anyhow!("no shape for output `{n}`"))?
        };
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            Dtype::F64 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        };
        bufs.push((n.clone(), shape, bytes));
    }
    let st_dtype = match dtype {
        Dtype::F32 => StDtype::F32,
        Dtype::F64 => StDtype::F64,
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow!("output `{n}`: {e}"))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

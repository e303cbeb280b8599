//! What the CUDA backend needs on the machine besides the driver, checked
//! before CubeCL is asked for a device: cubecl-cuda compiles every kernel
//! at run time with NVRTC, which it loads by name (through `cudarc`), and
//! hands NVRTC the CUDA headers under `$CUDA_PATH/include` (else those of
//! `/usr/local/cuda`, `/opt/cuda` or `/usr`). Without them CubeCL panics on its device
//! thread; here the missing piece is named instead.
//!
//! NVRTC need not be on the loader's path: one found in the CUDA folder's
//! `lib64`, `lib` or `targets/x86_64-linux/lib` is loaded from there (its
//! builtins library first), and stays loaded, so that the load by name
//! finds it. So `CUDA_PATH` may name a CUDA toolkit or the `nvidia/cu13`
//! folder of NVIDIA's pip wheels (`nvidia-cuda-nvrtc`, `nvidia-cuda-runtime`,
//! `nvidia-cuda-cccl`), such as a PyTorch environment holds.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The NVRTC library names cubecl-cuda's loader tries (CUDA 13, then 12).
const NVRTC_NAMES: [&str; 3] = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"];

/// The CUDA folder NVRTC's headers are taken from, by cubecl-cuda's own
/// rule: `CUDA_PATH`, else `/usr/local/cuda`, `/opt/cuda`, or `/usr` where
/// `/usr/bin/nvcc` exists; `/usr/local/cuda` (to name in errors) where
/// none is.
pub fn cuda_root() -> PathBuf {
    cubecl::cuda::install::cuda_path().unwrap_or_else(|| PathBuf::from("/usr/local/cuda"))
}

/// Library folders of a CUDA folder.
fn lib_dirs(root: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    ["lib64", "lib", "targets/x86_64-linux/lib"]
        .into_iter()
        .map(move |d| root.join(d))
}

/// The newest file in `root`'s library folders named `prefix` followed by
/// a version (`libnvrtc.so.13`), skipping NVIDIA's `.alt` variants.
fn versioned_library(root: &Path, prefix: &str) -> Option<PathBuf> {
    lib_dirs(root)
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.filter_map(Result::ok).map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix(prefix)
                    .is_some_and(|v| v.starts_with('.') && !v.contains("alt"))
            })
        })
        .max()
}

/// Loads `path` and keeps it loaded for the life of the process.
fn load_for_good(path: &Path) -> Result<(), String> {
    // SAFETY: NVIDIA's NVRTC libraries, whose initialisers have no
    // preconditions; nothing is called through the handle here.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    std::mem::forget(lib);
    Ok(())
}

/// Whether NVRTC loads by one of the names cubecl-cuda's loader tries.
fn nvrtc_by_name() -> bool {
    NVRTC_NAMES
        .iter()
        // SAFETY: as in `load_for_good`.
        .any(|name| unsafe { libloading::Library::new(name) }.is_ok())
}

/// Checks that the CUDA folder `root` has what NVRTC needs to compile
/// coopc's kernels, and that NVRTC loads: by name, else from `root`'s
/// library folders (loaded there, so that the load by name finds it).
/// Returns `root`; the error names what is missing and how to supply it.
pub fn check_cuda_toolkit(root: &Path) -> Result<PathBuf, String> {
    let how = "set CUDA_PATH to a CUDA toolkit, or to the nvidia/cu13 folder of \
               NVIDIA's pip wheels (pip install nvidia-cuda-nvrtc nvidia-cuda-runtime \
               nvidia-cuda-cccl)";
    let header = root.join("include").join("cuda_runtime.h");
    if !header.is_file() {
        return Err(format!(
            "NVRTC compiles the kernels at run time and needs the CUDA headers, but {} \
             does not exist ({how})",
            header.display()
        ));
    }
    if nvrtc_by_name() {
        return Ok(root.to_path_buf());
    }
    let Some(nvrtc) = versioned_library(root, "libnvrtc.so") else {
        return Err(format!(
            "NVRTC (libnvrtc.so.13 or .12) is neither on the library path nor under {}/lib64, \
             lib or targets/x86_64-linux/lib ({how})",
            root.display()
        ));
    };
    // NVRTC loads its builtins by name: load them from the same folder first.
    if let Some(builtins) = versioned_library(root, "libnvrtc-builtins.so") {
        load_for_good(&builtins)?;
    }
    load_for_good(&nvrtc)?;
    if nvrtc_by_name() {
        Ok(root.to_path_buf())
    } else {
        Err(format!(
            "{} loads, but not by the names the CUDA runtime looks for ({})",
            nvrtc.display(),
            NVRTC_NAMES.join(", ")
        ))
    }
}

/// [`check_cuda_toolkit`] of [`cuda_root`], once per process.
pub fn cuda_toolkit() -> Result<PathBuf, String> {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| check_cuda_toolkit(&cuda_root()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("coopc-toolkit-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_folder_without_the_headers_is_named_with_the_fix() {
        let dir = scratch("empty");
        let e = check_cuda_toolkit(&dir).unwrap_err();
        assert!(
            e.contains(&dir.join("include/cuda_runtime.h").display().to_string()),
            "{e}"
        );
        assert!(
            e.contains("CUDA_PATH") && e.contains("nvidia-cuda-nvrtc"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Headers without NVRTC are refused (where NVRTC is not on the
    /// library path); a CUDA folder that holds NVRTC outside the library
    /// path (`COOPC_CUDA_PATH`, NVIDIA's wheels in CI) is accepted, and
    /// afterwards NVRTC loads by the names the CUDA runtime uses. One test,
    /// so that nothing else loads NVRTC into the process in between.
    #[test]
    fn nvrtc_is_found_on_the_library_path_or_in_the_cuda_folder() {
        if !nvrtc_by_name() {
            let dir = scratch("headers");
            std::fs::create_dir_all(dir.join("include")).unwrap();
            std::fs::write(dir.join("include/cuda_runtime.h"), "").unwrap();
            let e = check_cuda_toolkit(&dir).unwrap_err();
            assert!(e.contains("NVRTC") && e.contains("lib64"), "{e}");
            std::fs::remove_dir_all(&dir).ok();
        }
        match std::env::var_os("COOPC_CUDA_PATH") {
            Some(root) => {
                let root = PathBuf::from(root);
                assert_eq!(check_cuda_toolkit(&root), Ok(root));
                assert!(nvrtc_by_name());
            }
            None => {
                eprintln!("COOPC_CUDA_PATH not set: NVRTC's load from a CUDA folder not checked")
            }
        }
    }
}

//! What the CUDA backend needs on the machine besides the driver, checked
//! before CubeCL is asked for a device: cubecl-cuda compiles every kernel
//! at run time with NVRTC, which it loads by name (through `cudarc`), and
//! hands NVRTC the CUDA headers under `$CUDA_PATH/include` (else those of
//! `/usr/local/cuda`, `/opt/cuda` or `/usr`). Without them CubeCL panics on its device
//! thread; here the missing piece is named instead.
//!
//! NVRTC need not be on the loader's path: the newest one in the CUDA
//! folder's `lib64`, `lib` or `targets/x86_64-linux/lib` is loaded from
//! there (its builtins library first), and stays loaded, so that the load
//! by name finds it. So `CUDA_PATH` may name a CUDA toolkit or the
//! `nvidia/cu13` folder of NVIDIA's pip wheels (`nvidia-cuda-nvrtc`,
//! `nvidia-cuda-runtime`, `nvidia-cuda-cccl`), such as a PyTorch
//! environment holds. The NVRTC the load by name then finds must be of the
//! headers' major CUDA version (an NVRTC 12 on the library path beside CUDA
//! 13 headers fails on every kernel): a mismatch is named as such.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The NVRTC library names cubecl-cuda's loader (`cudarc`) tries on Linux,
/// in its order: the first that loads is the one kernels are compiled with.
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

/// The numeric version after `prefix` in a library's file name
/// (`libnvrtc.so.13.0.88` → `[13, 0, 88]`); None for other names and for
/// NVIDIA's `.alt` variants.
fn library_version(name: &str, prefix: &str) -> Option<Vec<u32>> {
    let v = name.strip_prefix(prefix)?.strip_prefix('.')?;
    v.split('.').map(|part| part.parse().ok()).collect()
}

/// The newest file in `root`'s library folders named `prefix` followed by
/// a version (`libnvrtc.so.13`), by number (13 is newer than 9), skipping
/// NVIDIA's `.alt` variants.
fn versioned_library(root: &Path, prefix: &str) -> Option<PathBuf> {
    lib_dirs(root)
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.filter_map(Result::ok).map(|e| e.path()))
        .filter_map(|p| {
            let version = library_version(p.file_name()?.to_str()?, prefix)?;
            Some((version, p))
        })
        .max()
        .map(|(_, p)| p)
}

/// The CUDA version the headers under `root/include` are of (`cuda.h`'s
/// `CUDA_VERSION`: 13000 → (13, 0)); None where it cannot be read.
pub fn headers_version(root: &Path) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(root.join("include").join("cuda.h")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix('#')?.trim_start();
        let rest = rest.strip_prefix("define")?.trim_start();
        let v: u32 = rest.strip_prefix("CUDA_VERSION")?.trim().parse().ok()?;
        Some((v / 1000, v % 1000 / 10))
    })
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

/// NVRTC as cubecl-cuda's loader finds it: by the first of its names that
/// loads. Returns that name and the library; None where none loads.
pub fn nvrtc_by_name() -> Option<(&'static str, libloading::Library)> {
    NVRTC_NAMES.iter().find_map(|&name| {
        // SAFETY: as in `load_for_good`.
        let lib = unsafe { libloading::Library::new(name) }.ok()?;
        Some((name, lib))
    })
}

/// `nvrtcVersion` of a loaded NVRTC: (major, minor).
pub fn nvrtc_version(lib: &libloading::Library) -> Result<(u32, u32), String> {
    type Version = unsafe extern "C" fn(*mut i32, *mut i32) -> i32;
    // SAFETY: `nvrtcVersion` is NVRTC's documented C API with this
    // signature; it writes two ints through valid out-pointers.
    unsafe {
        let f: libloading::Symbol<Version> = lib.get(b"nvrtcVersion").map_err(|e| e.to_string())?;
        let (mut major, mut minor) = (0, 0);
        match f(&mut major, &mut minor) {
            0 => Ok((major.max(0) as u32, minor.max(0) as u32)),
            code => Err(format!("nvrtcVersion failed with code {code}")),
        }
    }
}

/// Checks that `lib`, the NVRTC found by `name`, is of the major version
/// of the headers under `root` (where `cuda.h` tells it).
fn check_nvrtc_matches_headers(
    root: &Path,
    name: &str,
    lib: &libloading::Library,
) -> Result<(), String> {
    let Some(headers) = headers_version(root) else {
        return Ok(());
    };
    let nvrtc =
        nvrtc_version(lib).map_err(|e| format!("NVRTC (loaded as {name}) does not answer: {e}"))?;
    if nvrtc.0 == headers.0 {
        return Ok(());
    }
    Err(format!(
        "NVRTC {}.{} (loaded as {name}) does not match the CUDA {}.{} headers in {}: \
         put the NVRTC of that CUDA version first on the library path \
         (LD_LIBRARY_PATH), or set CUDA_PATH to the toolkit NVRTC {}.{} belongs to",
        nvrtc.0,
        nvrtc.1,
        headers.0,
        headers.1,
        root.join("include").display(),
        nvrtc.0,
        nvrtc.1,
    ))
}

/// Checks that the CUDA folder `root` has what NVRTC needs to compile
/// coopc's kernels, and that NVRTC loads: from `root`'s library folders
/// where it is there (loaded, so that the load by name finds it), else by
/// name; and that the NVRTC found by name is of the headers' major version.
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
    let in_root = versioned_library(root, "libnvrtc.so");
    if let Some(nvrtc) = &in_root {
        // NVRTC loads its builtins by name: load them from the same folder first.
        if let Some(builtins) = versioned_library(root, "libnvrtc-builtins.so") {
            load_for_good(&builtins)?;
        }
        load_for_good(nvrtc)?;
    }
    match (nvrtc_by_name(), in_root) {
        (Some((name, lib)), _) => {
            check_nvrtc_matches_headers(root, name, &lib)?;
            Ok(root.to_path_buf())
        }
        (None, Some(nvrtc)) => Err(format!(
            "{} loads, but not by the names the CUDA runtime looks for ({})",
            nvrtc.display(),
            NVRTC_NAMES.join(", ")
        )),
        (None, None) => Err(format!(
            "NVRTC (libnvrtc.so.13 or .12) is neither on the library path nor under {}/lib64, \
             lib or targets/x86_64-linux/lib ({how})",
            root.display()
        )),
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
        if nvrtc_by_name().is_none() {
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
                assert_eq!(check_cuda_toolkit(&root), Ok(root.clone()));
                let (_, lib) = nvrtc_by_name().expect("NVRTC loads by name");
                let (major, _) = nvrtc_version(&lib).unwrap();
                assert_eq!(Some(major), headers_version(&root).map(|v| v.0));
                // The same NVRTC beside headers of another major version.
                let dir = scratch("mismatch");
                std::fs::create_dir_all(dir.join("include")).unwrap();
                std::fs::write(dir.join("include/cuda_runtime.h"), "").unwrap();
                let other = (major + 1) * 1000 + 20;
                std::fs::write(
                    dir.join("include/cuda.h"),
                    format!("#ifndef X\n#define CUDA_VERSION {other}\n#endif\n"),
                )
                .unwrap();
                let e = check_cuda_toolkit(&dir).unwrap_err();
                assert!(
                    e.contains(&format!("NVRTC {major}."))
                        && e.contains(&format!("CUDA {}.2 headers", major + 1)),
                    "{e}"
                );
                std::fs::remove_dir_all(&dir).ok();
            }
            None => {
                eprintln!("COOPC_CUDA_PATH not set: NVRTC's load from a CUDA folder not checked")
            }
        }
    }

    #[test]
    fn library_versions_compare_by_number() {
        let v = |n| library_version(n, "libnvrtc.so");
        assert_eq!(v("libnvrtc.so.13.0.88"), Some(vec![13, 0, 88]));
        assert!(v("libnvrtc.so.13") > v("libnvrtc.so.9"));
        assert!(v("libnvrtc.so.12.9") > v("libnvrtc.so.12"));
        assert_eq!(v("libnvrtc.so"), None);
        assert_eq!(v("libnvrtc.alt.so.13"), None);
        assert_eq!(v("libnvrtc.so.13.alt"), None);
        let dir = scratch("versions");
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        for n in [
            "libnvrtc.so.9",
            "libnvrtc.so.13",
            "libnvrtc.so.12.4",
            "libnvrtc.alt.so.14",
        ] {
            std::fs::write(dir.join("lib").join(n), "").unwrap();
        }
        assert_eq!(
            versioned_library(&dir, "libnvrtc.so"),
            Some(dir.join("lib/libnvrtc.so.13"))
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn headers_version_is_read_from_cuda_h() {
        let dir = scratch("cudah");
        assert_eq!(headers_version(&dir), None);
        std::fs::create_dir_all(dir.join("include")).unwrap();
        std::fs::write(
            dir.join("include/cuda.h"),
            "#ifndef __cuda_cuda_h__\n#define CUDA_VERSION_MACRO 1\n# define CUDA_VERSION 12040\n#endif\n",
        )
        .unwrap();
        assert_eq!(headers_version(&dir), Some((12, 4)));
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! The package as users install it: one abi3 wheel for every CPython ≥ 3.9 and the sdist it is
//! built from (`maturin build --release --sdist` builds the wheel from the unpacked sdist, so a
//! wheel proves the sdist builds), and the checks that it is what a manylinux wheel must be.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{output, root, run, Result};

/// The version of the whole workspace (Cargo.toml), which the wheel's metadata, `psleak
/// --version` and `psleak.__version__` must all say.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the module may need from the system: glibc's libraries and the unwinder, which every
/// manylinux policy allows. libelf and zlib are built in (the `portable` feature).
const SYSTEM_LIBRARIES: &[&str] = &["libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2"];

/// Builds the sdist and, from it, the wheel into target/wheels with the venv's maturin;
/// returns the wheel.
pub fn build(venv: &Path) -> Result<PathBuf> {
    let wheels = root().join("target/wheels");
    let _ = std::fs::remove_dir_all(&wheels);
    run(Command::new(venv.join("bin/maturin"))
        .args(["build", "--release", "--locked", "--sdist", "-q", "-o"])
        .arg(&wheels)
        .arg("-i")
        .arg(venv.join("bin/python"))
        .current_dir(root().join("python")))?;
    built(&wheels, ".whl")
}

fn built(dir: &Path, suffix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .ok_or_else(|| format!("maturin built no {suffix} in {}", dir.display()))
}

/// The wheel `build` made last.
pub fn wheel() -> Result<PathBuf> {
    built(&root().join("target/wheels"), ".whl")
}

/// The checks of a built wheel, each a named result (the suite counts each as a test), given the
/// venv it is installed in.
pub fn checks(wheel: &Path, venv: &Path) -> Vec<(&'static str, Result)> {
    let unpacked = root().join("target/wheel-unpacked");
    let module = unpack(wheel, &venv.join("bin/python"), &unpacked);
    vec![
        ("wheel: abi3 and manylinux tags", tags(wheel)),
        ("wheel: libelf and zlib built in", module.as_ref().map_err(Clone::clone).and_then(|m| needed(m))),
        ("wheel: stripped", module.as_ref().map_err(Clone::clone).and_then(|m| stripped(m))),
        ("wheel: auditwheel show accepts it", audited(wheel, venv)),
        ("wheel: an sdist beside it", built(wheel.parent().unwrap_or(&unpacked), ".tar.gz").map(drop)),
        ("wheel: the license's text in it", module.as_ref().map_err(Clone::clone).and_then(|_| licensed(&unpacked))),
        ("wheel: one version everywhere", versions(venv)),
    ]
}

fn tags(wheel: &Path) -> Result {
    let name = wheel.file_name().unwrap_or_default().to_string_lossy();
    let Some(platform) = name.strip_prefix(&format!("psleak-{VERSION}-cp39-abi3-")) else {
        return Err(format!("{name}: not psleak {VERSION} for the stable ABI of CPython 3.9+"));
    };
    match platform.strip_prefix("manylinux_2_").and_then(|p| p.strip_suffix("_x86_64.whl")) {
        Some(glibc) if glibc.parse::<u32>().is_ok() => Ok(()),
        _ => Err(format!("{name}: not a manylinux_2_NN_x86_64 wheel")),
    }
}

/// The wheel's native module, unpacked under `dir`.
fn unpack(wheel: &Path, python: &Path, dir: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    run(Command::new(python).args(["-m", "zipfile", "-e"]).arg(wheel).arg(dir))?;
    built(&dir.join("psleak"), ".so")
}

fn needed(module: &Path) -> Result {
    let dynamic = output(Command::new("readelf").arg("-d").arg(module))?;
    let foreign: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .filter(|library| !SYSTEM_LIBRARIES.contains(library))
        .collect();
    match foreign.as_slice() {
        [] => Ok(()),
        _ => Err(format!("the module needs {} from the system", foreign.join(", "))),
    }
}

/// The LICENSE file, as the metadata's License-File names it.
fn licensed(unpacked: &Path) -> Result {
    let info = unpacked.join(format!("psleak-{VERSION}.dist-info"));
    let metadata = std::fs::read_to_string(info.join("METADATA")).map_err(|e| format!("no METADATA: {e}"))?;
    let text = std::fs::read_to_string(info.join("licenses/LICENSE")).unwrap_or_default();
    let license = std::fs::read_to_string(root().join("LICENSE")).map_err(|e| format!("no LICENSE: {e}"))?;
    match (metadata.lines().any(|l| l == "License-File: LICENSE"), text == license) {
        (true, true) => Ok(()),
        (named, _) => Err(format!("dist-info/licenses/LICENSE is not the LICENSE (METADATA names it: {named})")),
    }
}

fn stripped(module: &Path) -> Result {
    let sections = output(Command::new("readelf").arg("-S").arg(module))?;
    if sections.contains(".debug_info") || sections.contains(".symtab") {
        return Err(format!("{} keeps its symbols or debug info", module.display()));
    }
    Ok(())
}

fn audited(wheel: &Path, venv: &Path) -> Result {
    let shown = output(Command::new(venv.join("bin/auditwheel")).arg("show").arg(wheel))?;
    let flat = shown.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.contains("is consistent with the following platform tag: \"manylinux_2_") {
        true => Ok(()),
        false => Err(format!("auditwheel show: {flat}")),
    }
}

/// `psleak --version`, `psleak.__version__` and the installed metadata, against the workspace's.
fn versions(venv: &Path) -> Result {
    let cli = output(Command::new(venv.join("bin/psleak")).arg("--version"))?;
    let package = output(Command::new(venv.join("bin/python")).args([
        "-c",
        "import importlib.metadata, psleak; print(psleak.__version__, importlib.metadata.version('psleak'))",
    ]))?;
    let said = format!("{} {}", cli.trim(), package.trim());
    match said == format!("psleak {VERSION} {VERSION} {VERSION}") {
        true => Ok(()),
        false => Err(format!("the versions differ from the workspace's {VERSION}: {said}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_abi3_manylinux_wheel_of_this_version_passes() {
        let named = |name: &str| tags(Path::new(name));
        assert!(named(&format!("psleak-{VERSION}-cp39-abi3-manylinux_2_34_x86_64.whl")).is_ok());
        assert!(named(&format!("psleak-{VERSION}-cp39-abi3-linux_x86_64.whl")).is_err(), "what pip builds by itself");
        assert!(named(&format!("psleak-{VERSION}-cp311-cp311-manylinux_2_34_x86_64.whl")).is_err(), "one per CPython");
        assert!(named("psleak-0.0.1-cp39-abi3-manylinux_2_34_x86_64.whl").is_err(), "another version");
    }
}

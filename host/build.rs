//! Builds the plugins for wasm32-wasip2 so that `cargo build` and `cargo test` need no
//! extra step (the pattern of wasmtime's test-programs artifacts crate).
//!
//! A nested `cargo build` compiles `plugins/*` (bundled into the server binary) and
//! `tests/plugins/*` (test-only plugins, found by the tests through
//! CONDUCTOR_TEST_PLUGINS) into a target directory of its own under OUT_DIR, so it never
//! waits on the outer build's lock. The outer build's flags are scrubbed: they are meant
//! for the host target.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Plugins compiled into the server and loaded at every start.
const BUNDLED: &[&str] = &["mock", "ec2", "openstack"];
/// Plugins only the tests load, each with the folder under CONDUCTOR_TEST_PLUGINS it is
/// copied to. Most tests load the folder itself; the sandbox tests' plugins sit in
/// subfolders (which `--plugins` does not descend into), so that the provider types and
/// accounts every other test expects stay the same.
const TEST_ONLY: &[(&str, &str)] = &[
    ("testbed", ""),
    ("hostile", "sandbox"),
    ("reach", "reach"),
    // The plugin authors copy (examples/provider-template), so a test proves it works.
    ("template", "template"),
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("host/ sits in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wasm_target = out_dir.join("wasm");

    for dir in [
        "wit",
        "plugins",
        "tests/plugins",
        "examples/provider-template",
    ] {
        rerun_if_changed_tree(&root.join(dir));
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    ensure_wasm_target();

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--locked",
        ])
        .arg("--target-dir")
        .arg(&wasm_target);
    for name in BUNDLED {
        cmd.args(["-p", &format!("conductor-plugin-{name}")]);
    }
    for (name, _) in TEST_ONLY {
        cmd.args(["-p", &format!("conductor-plugin-{name}")]);
    }
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("failed to run cargo for the plugins");
    assert!(
        status.success(),
        "building the plugins for wasm32-wasip2 failed"
    );

    let release = wasm_target.join("wasm32-wasip2").join("release");
    let wasm = |name: &str| release.join(format!("conductor_plugin_{name}.wasm"));

    let mut generated =
        String::from("/// Plugins compiled into the server: (file name, component bytes).\n");
    generated.push_str("pub const BUNDLED: &[(&str, &[u8])] = &[\n");
    for name in BUNDLED {
        let path = wasm(name);
        assert!(path.exists(), "{} was not built", path.display());
        writeln!(
            generated,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("writing to a String cannot fail");
    }
    generated.push_str("];\n");
    fs::write(out_dir.join("bundled_plugins.rs"), generated).expect("write bundled_plugins.rs");

    // The test-only plugins are copied into one folder (or a subfolder of it), which a
    // test passes as --plugins.
    let test_dir = out_dir.join("test-plugins");
    for (name, folder) in TEST_ONLY {
        let dir = test_dir.join(folder);
        fs::create_dir_all(&dir).expect("create a test-plugins folder");
        fs::copy(wasm(name), dir.join(format!("{name}.wasm"))).expect("copy test plugin");
    }
    println!(
        "cargo:rustc-env=CONDUCTOR_TEST_PLUGINS={}",
        test_dir.display()
    );
    // Where the plugins' dependencies are already compiled, so a test that builds a
    // plugin outside the workspace (tests/api/template.rs) need not compile them again.
    println!(
        "cargo:rustc-env=CONDUCTOR_WASM_TARGET_DIR={}",
        wasm_target.display()
    );
}

/// rust-toolchain.toml names the wasm32-wasip2 target, but a rustup that does not
/// install on its own (RUSTUP_AUTO_INSTALL=0) leaves it out; add it here, once, so the
/// README's commands need no manual rustup step.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let installed = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|dir| has_rlibs(&dir));
    if installed {
        return;
    }
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .status();
    match status {
        Ok(s) if s.success() => {}
        _ => println!(
            "cargo:warning=could not add the wasm32-wasip2 target; run `rustup target add wasm32-wasip2`"
        ),
    }
}

fn has_rlibs(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
    })
}

fn rerun_if_changed_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        if path.is_dir() {
            rerun_if_changed_tree(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

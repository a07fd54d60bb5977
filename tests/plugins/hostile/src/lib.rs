//! `hostile`: a target for the sandbox tests. Its `build` and `push` misbehave in the way
//! the `mode` parameter asks, so a test can show that each kind of misbehaviour fails
//! that one job with a reason a user can read, and nothing else:
//!
//! - `loop`: runs forever without calling the host;
//! - `memory`: allocates until memory runs out;
//! - `panic`: panics;
//! - `progress-flood`: reports progress two million times, then fails;
//! - `log-flood`: writes a million log lines, then fails;
//! - `huge-write`: writes on past the end of the disk until the host refuses, then gives
//!   up with the host's error (build only: a push has nothing to write to);
//! - `sleep`: sleeps for an hour in one host call;
//! - `remember`: fills a MiB of its memory with a byte no other call writes (and checks
//!   it can find those pages), then behaves; `snoop`: fails if any page of its memory
//!   already holds only that byte, which only a previous call could have left;
//! - no `mode`: behaves, building a raw copy of the base disk like `testbed`.

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

wit_bindgen::generate!({
    path: "../../../plugins/sdk/wit",
    world: "provider-plugin",
});

use conductor::provider::host::{self, DiskReader, DiskWriter, Level};
use conductor::provider::types::{
    Account, BuildOutput, DiskFormat, Error, ImageDetails, Provider, ProviderInfo, Template,
};
use exports::conductor::provider::provider::Guest;

struct Hostile;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
export!(Hostile);

/// Reports the flood modes send before they give up.
const PROGRESS_FLOOD: u32 = 2_000_000;
const LOG_FLOOD: u32 = 1_000_000;

fn param<'a>(parameters: &'a [(String, String)], name: &str) -> Option<&'a str> {
    parameters
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// The byte `remember` fills pages with: no page of a fresh instance holds only it.
const REMEMBERED: u8 = 0xc3;

/// The end of this instance's linear memory.
#[cfg(target_arch = "wasm32")]
fn memory_end() -> usize {
    core::arch::wasm32::memory_size(0) * 65536
}

/// Checked by clippy for the host too, where there is no linear memory to scan.
#[cfg(not(target_arch = "wasm32"))]
fn memory_end() -> usize {
    0
}

/// How many 4 KiB pages of this instance's linear memory hold only `byte`.
fn pages_holding_only(byte: u8) -> usize {
    let end = memory_end();
    // Page 0 is skipped: address 0 is never read through a pointer.
    (1..end / 4096)
        .filter(|page| {
            let start = (page * 4096) as *const u8;
            // SAFETY: every address below memory_size × 64 KiB is inside this instance's
            // linear memory; reads are volatile so the scan is not reasoned away.
            (0..4096).all(|i| unsafe { core::ptr::read_volatile(start.add(i)) } == byte)
        })
        .count()
}

/// Misbehaves as `mode` says. Returns only for the modes that end by themselves (the
/// floods, which then fail) or for no mode at all (`Ok`).
fn misbehave(mode: Option<&str>, output: Option<(&DiskWriter, u64)>) -> Result<(), Error> {
    match mode {
        None => Ok(()),
        Some("loop") => {
            let mut spins = 0u64;
            loop {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
        Some("memory") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Filled, not only reserved, so every page is really used.
                hoard.push(vec![0x5a; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Some("panic") => panic!("the hostile plugin panics as its mode=panic parameter asks"),
        Some("progress-flood") => {
            for i in 0..PROGRESS_FLOOD {
                // 100 % included: the host must not let a repeated "done" through.
                host::progress((i % 101) as u8, "flooding the host with progress");
            }
            Err(Error::Failed(format!(
                "sent {PROGRESS_FLOOD} progress reports as mode=progress-flood asks"
            )))
        }
        Some("log-flood") => {
            for i in 0..LOG_FLOOD {
                host::log(Level::Warn, &format!("hostile log flood, line {i}"));
            }
            Err(Error::Failed(format!(
                "wrote {LOG_FLOOD} log lines as mode=log-flood asks"
            )))
        }
        Some("huge-write") => {
            let Some((output, size)) = output else {
                return Err(Error::InvalidInput(
                    "mode=huge-write needs a disk to write: use it for a build".into(),
                ));
            };
            let chunk = vec![0xa5; 1 << 20];
            let mut offset = size;
            loop {
                // Gives up with the host's refusal, as a plugin that checks errors would.
                output.write(offset, &chunk)?;
                offset += chunk.len() as u64;
            }
        }
        Some("sleep") => {
            std::thread::sleep(std::time::Duration::from_secs(3600));
            Ok(())
        }
        Some("remember") => {
            let kept = vec![REMEMBERED; 1 << 20];
            std::hint::black_box(&kept);
            let found = pages_holding_only(REMEMBERED);
            if found < 255 {
                return Err(Error::Failed(format!(
                    "mode=remember wrote 256 pages but the scan found {found}"
                )));
            }
            host::log(Level::Info, &format!("remembered {found} pages"));
            Ok(())
        }
        Some("snoop") => match pages_holding_only(REMEMBERED) {
            0 => Ok(()),
            found => Err(Error::Failed(format!(
                "found {found} pages an earlier call left in this instance's memory"
            ))),
        },
        Some(other) => Err(Error::InvalidInput(format!(
            "unknown mode {other:?}: loop, memory, panic, progress-flood, log-flood, huge-write, sleep, remember or snoop"
        ))),
    }
}

impl Guest for Hostile {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "hostile".into(),
            display_name: "Hostile (sandbox tests)".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            credentials: Vec::new(),
            settings: Vec::new(),
            format: DiskFormat::Raw,
            hosts: Vec::new(),
        }
    }

    fn check_account(_provider: Provider, _account: Account) -> Result<(), Error> {
        Ok(())
    }

    fn build(
        _template: Template,
        base: &DiskReader,
        output: &DiskWriter,
        parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        let size = base.size();
        output.set_size(size)?;
        misbehave(param(&parameters, "mode"), Some((output, size)))?;
        for extent in base.extents()? {
            let mut offset = extent.offset;
            while offset < extent.offset + extent.length {
                let length = (extent.offset + extent.length - offset).min(1 << 20) as u32;
                let bytes = base.read(offset, length)?;
                output.write(offset, &bytes)?;
                offset += u64::from(length);
            }
        }
        host::progress(100, "hostile build behaved");
        Ok(BuildOutput {
            format: DiskFormat::Raw,
            virtual_size: size,
        })
    }

    fn push(
        provider: Provider,
        _account: Account,
        _image: &DiskReader,
        name: String,
        parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        misbehave(param(&parameters, "mode"), None)?;
        host::progress(100, "hostile push behaved");
        Ok(format!("Hostile_{}_{}", provider.name, name))
    }

    fn delete(_provider: Provider, _account: Account, _id: String) -> Result<(), Error> {
        Ok(())
    }

    fn lookup(
        _provider: Provider,
        _account: Account,
        target_identifier: String,
    ) -> Result<ImageDetails, Error> {
        Err(Error::NotFound(format!(
            "no hostile image {target_identifier}"
        )))
    }
}

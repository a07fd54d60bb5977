//! The plugin side of `wit/provider.wit`, which this crate carries so that a plugin
//! outside the repository needs nothing else: the generated bindings of the `plugin`
//! world and the glue every plugin would otherwise write again: the host's disk
//! resources as the image writers' [`Source`](crate::Source) and [`Sink`](crate::Sink),
//! parameter and setting lookups, and error messages.
//!
//! A plugin implements [`Guest`] and [`target::Guest`] and exports them with
//! [`export_provider!`]:
//!
//! ```ignore
//! use conductor_plugin_sdk::guest::{Guest, target, types::*, host::*};
//! struct MyCloud;
//! impl Guest for MyCloud { /* info, check_account, build, push, delete, lookup */ }
//! impl target::Guest for MyCloud { /* needs */ }
//! conductor_plugin_sdk::guest::export_provider!(MyCloud);
//! ```

/// The generated bindings. `export_provider!` refers to them by this path.
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export_provider",
        default_bindings_module: "conductor_plugin_sdk::guest::bindings",
    });
}

pub use bindings::conductor::provider::{host, types};
/// Exports a type implementing [`Guest`] and [`target::Guest`] as the plugin's
/// `provider` and `target` interfaces.
pub use bindings::export_provider;
pub use bindings::exports::conductor::provider::provider::Guest;
/// What the target needs from the OS in its images: [`target::Guest::needs`].
pub use bindings::exports::conductor::provider::target;

impl target::OsNeeds {
    /// A target that boots nothing and needs nothing in its images (a test target).
    pub fn nothing() -> Self {
        target::OsNeeds {
            packages: Vec::new(),
            firmware: Vec::new(),
        }
    }
}

use host::{DiskReader, DiskWriter};
use types::{BuildOutput, DiskFormat, Error};

/// The firmware the image being pushed boots with, from the server's `image.firmware`
/// push parameter (`uefi`, `bios`, `uefi,bios`; since 0.1.1); empty when the server did
/// not say (a blank disk, a base image from elsewhere, an older server).
pub fn image_firmware(parameters: &[(String, String)]) -> Vec<target::Firmware> {
    lookup(parameters, "image.firmware")
        .unwrap_or_default()
        .split(',')
        .filter_map(|name| match name.trim() {
            "uefi" => Some(target::Firmware::Uefi),
            "bios" => Some(target::Firmware::Bios),
            _ => None,
        })
        .collect()
}

/// The value of the pair named `name` in a list of parameters, settings or credentials.
pub fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

impl types::CredentialDefinition {
    /// A credential accounts carry: its API `name`, the `label` people read, and its
    /// input type (`text`, `password`, `file`; with `?` after it when optional).
    pub fn new(name: &str, label: &str, input_type: &str) -> Self {
        types::CredentialDefinition {
            name: name.into(),
            label: label.into(),
            input_type: input_type.into(),
        }
    }
}

impl Error {
    /// The message, whatever the kind of failure.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidInput(m)
            | Error::BadCredentials(m)
            | Error::NotFound(m)
            | Error::Unavailable(m)
            | Error::Failed(m) => m,
        }
    }
}

impl From<crate::Error> for Error {
    fn from(error: crate::Error) -> Self {
        Error::Failed(error.0)
    }
}

/// The host's disk reader as the image writers' source.
pub struct HostSource<'a>(pub &'a DiskReader);

impl crate::Source for HostSource<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn extents(&self) -> Result<Vec<(u64, u64)>, crate::Error> {
        self.0
            .extents()
            .map(|runs| runs.iter().map(|e| (e.offset, e.length)).collect())
            .map_err(|e| crate::Error(e.message().to_owned()))
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, crate::Error> {
        self.0
            .read(offset, len)
            .map_err(|e| crate::Error(e.message().to_owned()))
    }

    fn data_runs(
        &self,
        offset: u64,
        len: u64,
        granule: u64,
    ) -> Option<Result<Vec<(u64, u64)>, crate::Error>> {
        let granule = u32::try_from(granule).ok()?;
        Some(
            self.0
                .data_runs(offset, len, granule)
                .map(|runs| runs.iter().map(|e| (e.offset, e.length)).collect())
                .map_err(|e| crate::Error(e.message().to_owned())),
        )
    }
}

/// The host's disk writer as the image writers' sink; with the reader it is written
/// from, it copies data inside the host.
pub struct HostSink<'a> {
    pub writer: &'a DiskWriter,
    pub source: Option<&'a DiskReader>,
}

impl crate::Sink for HostSink<'_> {
    fn copy_from_source(
        &mut self,
        offset: u64,
        len: u64,
        at: u64,
    ) -> Option<Result<(), crate::Error>> {
        let source = self.source?;
        Some(
            self.writer
                .copy_from(source, offset, len, at)
                .map_err(|e| crate::Error(e.message().to_owned())),
        )
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), crate::Error> {
        self.writer
            .write(offset, data)
            .map_err(|e| crate::Error(e.message().to_owned()))
    }

    fn set_size(&mut self, size: u64) -> Result<(), crate::Error> {
        self.writer
            .set_size(size)
            .map_err(|e| crate::Error(e.message().to_owned()))
    }
}

/// Writes `base` into `output` in `format`, reporting progress from 0 to `up_to` percent:
/// the whole of a build for targets that take the disk as it is.
pub fn write_disk(
    format: crate::Format,
    base: &DiskReader,
    output: &DiskWriter,
    up_to: u8,
) -> Result<u64, Error> {
    host::progress(0, "writing the image from the base disk");
    let mut last = 0u8;
    crate::write_image(
        format,
        &HostSource(base),
        &mut HostSink {
            writer: output,
            source: Some(base),
        },
        &mut |done, total| {
            let percent = (done * u64::from(up_to) / total.max(1)) as u8;
            if percent != last {
                last = percent;
                host::progress(percent, &format!("written {done} of {total} bytes"));
            }
        },
    )
    .map_err(|e| Error::Failed(format!("writing the {format:?} image: {e}")))
}

/// The whole of a build for targets that take the base disk as it is, in `format`:
/// the image written with progress, 100 % reported, and what the server records.
pub fn build_image(
    format: crate::Format,
    base: &DiskReader,
    output: &DiskWriter,
) -> Result<BuildOutput, Error> {
    write_disk(format, base, output, 99)?;
    host::progress(100, "build complete");
    Ok(BuildOutput {
        format: match format {
            crate::Format::Raw => DiskFormat::Raw,
            crate::Format::Qcow2 => DiskFormat::Qcow2,
            crate::Format::Vmdk => DiskFormat::Vmdk,
        },
        virtual_size: base.size(),
    })
}

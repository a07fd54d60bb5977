//! The host side of the WIT `host` interface: progress and log lines, the provider's
//! key-value state, and the disk resources a build or push reads and writes.

use super::{
    DiskReader, DiskWriter, STATE_MAX_KEY, STATE_MAX_KEYS, STATE_MAX_LISTED, STATE_MAX_VALUE,
    State, StateError, StateStore, sandbox, wit, wit_host,
};
use wasmtime::component::Resource;

impl wit::Host for State {}

impl wit_host::Host for State {
    fn progress(&mut self, percent: u8, activity: String) -> wasmtime::Result<()> {
        // Plugins that sleep or wait in host calls still report progress: a stop request
        // takes effect here as well as at the next epoch tick.
        if self.context.stop.reason().is_some() {
            return Err(wasmtime::Error::from(wasmtime::Trap::Interrupt));
        }
        // Activities are one line and short; a plugin cannot flood the status with text.
        let line: String = activity
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        (self.context.progress)(percent.min(100), &line);
        Ok(())
    }

    fn log(&mut self, level: wit_host::Level, message: String) -> wasmtime::Result<()> {
        let job = &self.context.label;
        match self.log.next() {
            sandbox::LogLine::Write => {}
            sandbox::LogLine::WriteDroppedNotice => {
                tracing::warn!(
                    job,
                    "plugin: further log lines dropped: a call may write {} lines",
                    sandbox::MAX_LOG_LINES
                );
                return Ok(());
            }
            sandbox::LogLine::Drop => return Ok(()),
        }
        let message: String = message.chars().take(2000).collect();
        match level {
            wit_host::Level::Debug => tracing::debug!(job, "plugin: {message}"),
            wit_host::Level::Info => tracing::info!(job, "plugin: {message}"),
            wit_host::Level::Warn => tracing::warn!(job, "plugin: {message}"),
            wit_host::Level::Error => tracing::error!(job, "plugin: {message}"),
        }
        Ok(())
    }

    fn state_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if key.len() > STATE_MAX_KEY {
            return Ok(None);
        }
        Ok(self.with_state(None, |s| s.get(&key)))
    }

    fn state_set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        if key.len() > STATE_MAX_KEY || value.len() > STATE_MAX_VALUE {
            return Ok(Err(wit::Error::InvalidInput(format!(
                "state keys are at most {STATE_MAX_KEY} bytes and values at most {STATE_MAX_VALUE} bytes"
            ))));
        }
        if self.context.state.is_none() {
            return Ok(Err(wit::Error::InvalidInput(
                "there is no provider state during a build".into(),
            )));
        }
        let stored = self.with_state(false, |s| s.set(&key, &value, STATE_MAX_KEYS));
        Ok(if stored {
            Ok(())
        } else {
            Err(wit::Error::Failed(format!(
                "the provider's state is full ({STATE_MAX_KEYS} keys) or could not be written"
            )))
        })
    }

    fn state_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.with_state((), |s| s.delete(&key));
        Ok(())
    }

    fn state_keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        Ok(self.with_state(Vec::new(), |s| s.keys(&prefix, STATE_MAX_LISTED)))
    }
}

impl State {
    /// Runs `f` on the state store, logging (not trapping on) storage failures: a
    /// plugin sees a missing value or a failed write, never a host crash.
    fn with_state<T>(
        &self,
        default: T,
        f: impl FnOnce(&dyn StateStore) -> Result<T, StateError>,
    ) -> T {
        match &self.context.state {
            Some(state) => match f(state.as_ref()) {
                Ok(value) => value,
                Err(e) => {
                    tracing::error!(job = %self.context.label, "plugin state: {e}: {}", e.0);
                    default
                }
            },
            None => default,
        }
    }
}

fn io_error(e: std::io::Error) -> wit::Error {
    wit::Error::Failed(format!("disk access failed: {e}"))
}

impl wit_host::HostDiskReader for State {
    fn size(&mut self, disk: Resource<DiskReader>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&disk)?.size())
    }

    fn read(
        &mut self,
        disk: Resource<DiskReader>,
        offset: u64,
        length: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .read(offset, length)
            .map_err(io_error))
    }

    fn extents(
        &mut self,
        disk: Resource<DiskReader>,
    ) -> wasmtime::Result<Result<Vec<wit_host::Extent>, wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .extents()
            .map_err(io_error)
            .map(|runs| {
                runs.into_iter()
                    .map(|(offset, length)| wit_host::Extent { offset, length })
                    .collect()
            }))
    }

    fn data_runs(
        &mut self,
        disk: Resource<DiskReader>,
        offset: u64,
        length: u64,
        granule: u32,
    ) -> wasmtime::Result<Result<Vec<wit_host::Extent>, wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .data_runs(offset, length, granule)
            .map_err(io_error)
            .map(|runs| {
                runs.into_iter()
                    .map(|(offset, length)| wit_host::Extent { offset, length })
                    .collect()
            }))
    }

    fn drop(&mut self, disk: Resource<DiskReader>) -> wasmtime::Result<()> {
        self.table.delete(disk)?;
        Ok(())
    }
}

impl wit_host::HostDiskWriter for State {
    fn write(
        &mut self,
        disk: Resource<DiskWriter>,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .write(offset, &data)
            .map_err(io_error))
    }

    fn set_size(
        &mut self,
        disk: Resource<DiskWriter>,
        size: u64,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        Ok(self.table.get(&disk)?.set_size(size).map_err(io_error))
    }

    fn copy_from(
        &mut self,
        disk: Resource<DiskWriter>,
        source: Resource<DiskReader>,
        offset: u64,
        length: u64,
        at: u64,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        let source = self.table.get(&source)?;
        let writer = self.table.get(&disk)?;
        Ok(writer
            .copy_from(source, offset, length, at)
            .map_err(io_error))
    }

    fn drop(&mut self, disk: Resource<DiskWriter>) -> wasmtime::Result<()> {
        self.table.delete(disk)?;
        Ok(())
    }
}

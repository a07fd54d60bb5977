//! The raw writer: owns copying the source's allocated data to the same offsets of the
//! sink, so the image is the disk byte for byte. Zero data is not written at all, which
//! leaves holes in a sparse sink and costs nothing in one that is not, since the [`Sink`]
//! contract says unwritten regions read as zeros.

use crate::{
    Error, Sink, Source, chunk_usize, for_each_chunk, for_each_window, is_zero, passes_through,
};

/// The unit in which zero data is detected and skipped. 64 KiB keeps the number of writes
/// low on mixed data while still leaving out the large zero runs of a typical disk.
const BLOCK: u64 = 64 << 10;

pub(crate) fn write(
    source: &dyn Source,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, Error> {
    let size = source.size();
    // Setting the length first lets a sink preallocate or truncate, and makes a disk that
    // ends in zeros come out at its full size even though those zeros are never written.
    sink.set_size(size)?;
    if passes_through(source, sink) {
        // Only where the data is is asked; the sink copies it, unread here.
        return for_each_window(source, BLOCK, progress, |offset, len| {
            let runs = source
                .data_runs(offset, len, BLOCK)
                .unwrap_or_else(|| Err(Error("the source stopped finding data runs".into())))?;
            for (run, run_len) in runs {
                let copied = run_len.min(size.saturating_sub(run));
                sink.copy_from_source(run, copied, run)
                    .unwrap_or_else(|| Err(Error("the sink stopped copying".into())))?;
            }
            Ok(())
        })
        .map(|()| size);
    }
    let block = chunk_usize(BLOCK);
    for_each_chunk(source, BLOCK, progress, |offset, data| {
        // The chunk is padded with zeros past the source's end; those bytes are not
        // part of the disk and must not grow the file.
        let len = chunk_usize(size.saturating_sub(offset).min(data.len() as u64));
        let data = &data[..len];
        let mut run: Option<usize> = None;
        for (index, piece) in data.chunks(block).enumerate() {
            let start = index * block;
            match (is_zero(piece), run) {
                (true, Some(run_start)) => {
                    sink.write(offset + run_start as u64, &data[run_start..start])?;
                    run = None;
                }
                (false, None) => run = Some(start),
                _ => {}
            }
        }
        if let Some(run_start) = run {
            sink.write(offset + run_start as u64, &data[run_start..])?;
        }
        Ok(())
    })?;
    Ok(size)
}

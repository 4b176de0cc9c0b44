//! Room key export and import (key export files): streamed export, and an
//! import that derives the keys off the caller's thread and parses batches
//! ahead on a worker.

use std::collections::HashMap;

use newt_proto::changes::Changes;
use newt_proto::export::{ExportKdf, ExportKeys, ExportStream, ExportWriter, ExportedRoomKey};
use newt_proto::ids::RoomId;
use newt_proto::megolm::{export_record, session_from_export, should_replace};
use newt_proto::records::{InboundGroupSessionRecord, SessionSource};

use crate::progress::report;
use crate::{Error, Progress};

use super::{clone_record, ImportOptions, ImportSummary, Machine, IMPORT_BATCH};

impl Machine {
    /// Exports every inbound session to a key export file protected by
    /// `passphrase` (PBKDF2 with `rounds` iterations; use ≥ 100,000).
    /// `progress` gets the running count of keys written after each page of
    /// sessions (with 0 as the total, which is not known in advance). See
    /// [`Progress`] for an example.
    pub async fn export_room_keys(
        &self,
        passphrase: &str,
        rounds: u32,
        progress: Option<&dyn Progress>,
    ) -> Result<String, Error> {
        let bytes = self.export_room_keys_to(Vec::new(), passphrase, rounds, progress).await?;
        String::from_utf8(bytes).map_err(|_| Error::Internal("export is not UTF-8"))
    }

    /// [`export_room_keys`](Self::export_room_keys) into `out` (Rust only:
    /// a `Write` sink, e.g. a file, so the export is never held whole).
    /// Sessions are read from the store a page at a time and written one at
    /// a time, so memory stays flat however many there are.
    pub async fn export_room_keys_to<W: std::io::Write>(
        &self,
        out: W,
        passphrase: &str,
        rounds: u32,
        progress: Option<&dyn Progress>,
    ) -> Result<W, Error> {
        let mut writer = ExportWriter::new(out, passphrase, rounds)?;
        let mut cursor = None;
        loop {
            let page = self.store().inbound_group_sessions_page(cursor.clone(), 1000).await?;
            let Some(last) = page.last() else { break };
            cursor = Some((last.room_id.clone(), last.session_id.clone()));
            for r in page {
                writer.push(&export_record(r))?;
            }
            report(progress, writer.keys_written(), 0);
        }
        Ok(writer.finish()?)
    }

    /// Imports a key export file. Keys are checked and committed in batches
    /// of 2,000; `progress` gets `(done, total)` after each batch is
    /// committed (so `done` keys are durable). Existing sessions are only
    /// replaced by ones that start at a lower index. A file asking for more
    /// than `options.max_rounds` PBKDF2 rounds
    /// ([`DEFAULT_MAX_ROUNDS`](crate::DEFAULT_MAX_ROUNDS) by default) is
    /// refused before any key derivation. The derivation (PBKDF2: seconds of
    /// CPU) runs on a thread of its own on native targets, not on the
    /// caller's executor; on wasm32 it runs inline. See [`Progress`] for an
    /// example.
    pub async fn import_room_keys(
        &self,
        file: &str,
        passphrase: &str,
        options: &ImportOptions,
        progress: Option<&dyn Progress>,
    ) -> Result<ImportSummary, Error> {
        // The round count is checked here, before any derivation.
        let kdf = ExportKdf::read(file, options.max_rounds)?;
        let keys = derive_export_keys(kdf, passphrase).await?;
        // Authenticate, decrypt and validate in one streaming pass; then
        // decrypt again, parse, check and commit one batch at a time, so
        // memory holds a few batches, never the decrypted file. Parsing the
        // next batches (on another thread where there are threads) overlaps
        // committing this one.
        let stream = ExportStream::open_with_keys(file, &keys)?;
        drop(keys); // The stream holds its own copy; this one is zeroised now.
        let total = stream.total();
        let mut summary = ImportSummary { total, ..Default::default() };
        let mut st = self.inner.state.lock().await;
        let mut batches = ImportBatches::start(stream);
        let mut changes = Changes::default();
        while let Some((records, done)) = batches.next().await? {
            // What the store already holds of this batch, in one read.
            let keys: Vec<(RoomId, String)> = records
                .iter()
                .flatten()
                .map(|r| (r.room_id.clone(), r.session_id.clone()))
                .collect();
            let mut stored: HashMap<(RoomId, String), InboundGroupSessionRecord> = self
                .store()
                .inbound_group_sessions(&keys)
                .await?
                .into_iter()
                .map(|r| ((r.room_id.clone(), r.session_id.clone()), r))
                .collect();
            drop(keys);
            // Within a batch, a later copy of the same session competes with
            // the earlier one, not with the store.
            let mut seen: HashMap<(RoomId, String), usize> = HashMap::new();
            for record in records {
                let Some(record) = record else {
                    summary.skipped += 1;
                    continue;
                };
                let k = (record.room_id.clone(), record.session_id.clone());
                let existing = match seen.get(&k) {
                    Some(j) => {
                        changes.inbound_group_sessions.get(*j).map(clone_record).transpose()?
                    }
                    None => stored.remove(&k),
                };
                let better = match &existing {
                    None => true,
                    Some(e) => should_replace(e, &record).unwrap_or(false),
                };
                if better {
                    seen.insert(k, changes.inbound_group_sessions.len());
                    changes.inbound_group_sessions.push(record);
                    summary.imported += 1;
                } else {
                    summary.skipped += 1;
                }
            }
            self.commit(&mut st, std::mem::take(&mut changes), false).await?;
            report(progress, done, total);
        }
        self.commit(&mut st, changes, false).await?;
        Ok(summary)
    }
}

/// Derives a key export's keys from `passphrase` off the caller's executor:
/// on a thread of its own on native targets (one core's work either way, so
/// `set_max_threads` does not apply), inline on wasm32, which has no threads.
async fn derive_export_keys(kdf: ExportKdf, passphrase: &str) -> Result<ExportKeys, Error> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let passphrase = zeroize::Zeroizing::new(passphrase.to_owned());
        off_thread(move || kdf.derive(&passphrase)).await
    }
    #[cfg(target_arch = "wasm32")]
    {
        Ok(kdf.derive(passphrase))
    }
}

/// Runs `work` on a thread of its own and waits for it without blocking the
/// caller's executor. A thread the OS will not start is an error, not a
/// panic.
#[cfg(not(target_arch = "wasm32"))]
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("newt-kdf".into())
        .spawn(move || {
            // Nobody waiting (the import was dropped): nothing to do.
            let _ = tx.send(work());
        })
        .map_err(|_| Error::Internal("cannot start a thread"))?;
    rx.await.map_err(|_| Error::Internal("key derivation thread stopped"))
}

/// Batches of an import, parsed into session records (`None` for an invalid
/// key) with the count of keys read so far. The file is decrypted and its
/// JSON parsed here, a batch at a time; on native targets the session keys
/// (the expensive part) are parsed on a worker thread, two batches ahead,
/// while the caller commits. On wasm32 everything happens when asked for.
struct ImportBatches<'a> {
    stream: ExportStream<'a>,
    /// No worker: a file of one batch is parsed when asked for (a thread
    /// would only add its start-up cost), as is every file when
    /// `parallel::set_max_threads(1)` keeps work on the caller's thread.
    #[cfg(not(target_arch = "wasm32"))]
    inline: bool,
    #[cfg(not(target_arch = "wasm32"))]
    worker: Option<ImportWorker>,
    /// `stream.done()` after each batch handed to the worker, oldest first.
    #[cfg(not(target_arch = "wasm32"))]
    in_flight: std::collections::VecDeque<usize>,
}

#[cfg(not(target_arch = "wasm32"))]
struct ImportWorker {
    keys: std::sync::mpsc::Sender<Vec<ExportedRoomKey>>,
    records: futures::channel::mpsc::UnboundedReceiver<Vec<Option<InboundGroupSessionRecord>>>,
    thread: std::thread::JoinHandle<()>,
}

type ParsedBatch = (Vec<Option<InboundGroupSessionRecord>>, usize);

impl<'a> ImportBatches<'a> {
    fn start(stream: ExportStream<'a>) -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        {
            if stream.total() <= IMPORT_BATCH || newt_proto::parallel::max_threads() < 2 {
                return Self { stream, inline: true, worker: None, in_flight: Default::default() };
            }
            let (keys, keys_rx) = std::sync::mpsc::channel::<Vec<ExportedRoomKey>>();
            let (records_tx, records) = futures::channel::mpsc::unbounded();
            // Ends when `keys` is dropped (or nobody takes the records).
            let thread = std::thread::spawn(move || {
                while let Ok(batch) = keys_rx.recv() {
                    if records_tx.unbounded_send(sessions_from_export(&batch)).is_err() {
                        break;
                    }
                }
            });
            let worker = Some(ImportWorker { keys, records, thread });
            Self { stream, inline: false, worker, in_flight: Default::default() }
        }
        #[cfg(target_arch = "wasm32")]
        {
            Self { stream }
        }
    }

    /// The next batch parsed here, or `None` at the end.
    fn parse_here(&mut self) -> Result<Option<ParsedBatch>, Error> {
        let batch = self.stream.next_batch(IMPORT_BATCH)?;
        if batch.is_empty() {
            return Ok(None);
        }
        Ok(Some((sessions_from_export(&batch), self.stream.done())))
    }

    async fn next(&mut self) -> Result<Option<ParsedBatch>, Error> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            use futures::StreamExt;
            if self.inline {
                return self.parse_here();
            }
            let Some(worker) = &mut self.worker else { return Ok(None) };
            while self.in_flight.len() < 2 {
                let batch = self.stream.next_batch(IMPORT_BATCH)?;
                if batch.is_empty() {
                    break;
                }
                self.in_flight.push_back(self.stream.done());
                worker.keys.send(batch).map_err(|_| Error::Internal("import worker stopped"))?;
            }
            let Some(done) = self.in_flight.pop_front() else { return Ok(None) };
            match worker.records.next().await {
                Some(records) => Ok(Some((records, done))),
                None => {
                    // The worker died: if it panicked, so do we (rather than
                    // report a short import as complete).
                    if let Some(w) = self.worker.take() {
                        drop(w.keys);
                        if let Err(panic) = w.thread.join() {
                            std::panic::resume_unwind(panic);
                        }
                    }
                    Err(Error::Internal("import worker stopped"))
                }
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            self.parse_here()
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Drop for ImportBatches<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            // Closing both channels stops the worker after its current batch.
            drop(w.keys);
            drop(w.records);
            // A panic there ends only the parsing; this import already ended.
            let _ = w.thread.join();
        }
    }
}

/// [`session_from_export`] for a batch of keys (`None` for an invalid one),
/// in order, on every core where there are threads.
fn sessions_from_export(keys: &[ExportedRoomKey]) -> Vec<Option<InboundGroupSessionRecord>> {
    newt_proto::parallel::map(keys, 32, |k| session_from_export(k, SessionSource::Imported).ok())
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use newt_proto::export::{encrypt_export, DEFAULT_MAX_ROUNDS};

    #[test]
    fn export_key_derivation_runs_off_the_callers_thread() {
        let here = std::thread::current().id();
        let there = futures::executor::block_on(off_thread(|| std::thread::current().id()));
        assert_ne!(there.unwrap(), here);
        let file = encrypt_export(&[], "pw", 1_000).unwrap();
        let kdf = ExportKdf::read(&file, DEFAULT_MAX_ROUNDS).unwrap();
        let keys = futures::executor::block_on(derive_export_keys(kdf, "pw")).unwrap();
        assert_eq!(ExportStream::open_with_keys(&file, &keys).unwrap().total(), 0);
    }
}

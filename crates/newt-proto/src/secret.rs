//! Buffers for secret bytes (pickles, sealed records, Olm plaintexts).

use zeroize::Zeroizing;

/// A growable byte buffer for secrets: an [`std::io::Write`] sink whose
/// every allocation is zeroised when it is outgrown or dropped (a plain
/// `Vec` frees its old copy unwiped on each reallocation).
///
/// ```
/// use std::io::Write;
/// let mut buf = newt_proto::secret::SecretBuf::with_capacity(4);
/// buf.write_all(b"more than four bytes")?;
/// assert_eq!(&buf.into_inner()[..], b"more than four bytes");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct SecretBuf(Zeroizing<Vec<u8>>);

impl SecretBuf {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// Appends `bytes`; an outgrown allocation is zeroised.
    pub fn push(&mut self, bytes: &[u8]) {
        let needed = self.0.len() + bytes.len();
        if needed > self.0.capacity() {
            let mut bigger = Vec::with_capacity(needed.max(2 * self.0.capacity()));
            bigger.extend_from_slice(&self.0);
            // The old allocation is zeroised as it is dropped here.
            self.0 = Zeroizing::new(bigger);
        }
        self.0.extend_from_slice(bytes);
    }

    /// The bytes written (zeroised when dropped).
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl std::io::Write for SecretBuf {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

//! The content address of an image body: a SHA-256 that skips zeros.
//!
//! Disk images are mostly zeros, often unallocated. A SHA-256 of every byte has to feed
//! each zero through the compression function (about 1.5 GB/s here: two minutes for a
//! 200 GB disk), because the hash has no shortcut for a run of zeros. The sparse digest
//! gives a zero block no input at all, so a hole costs nothing and an allocated zero
//! block costs one comparison:
//!
//! ```text
//! SHA-256( "conductor sparse-sha256 v1\0"
//!          ‖ for every 64 KiB block i that is not all zeros: u64be(i) ‖ the block
//!          ‖ u64be(length in bytes) )
//! ```
//!
//! The last block may be shorter; its length follows from the total. The encoding is
//! one-to-one (an index says where each block lies, the length ends it), so two bodies
//! have the same digest only if they are equal or SHA-256 collides. It is written
//! `sparse-sha256:<hex>` in documents and `sparse-sha256-<hex>` as a blob's name;
//! bodies stored before it came are named by their plain SHA-256 (64 hex digits), and
//! keep that name. The README ("Disk images") gives clients the same definition.

use sha2::{Digest, Sha256};

/// The unit of the digest: a block of zeros this size adds nothing to the hash.
pub const BLOCK: usize = 64 << 10;
const DOMAIN: &[u8] = b"conductor sparse-sha256 v1\0";
/// How a blob named by the sparse digest begins.
const NAME_PREFIX: &str = "sparse-sha256-";

/// A sparse digest being computed over a stream of bytes and runs of zeros.
pub struct SparseDigest {
    hasher: Sha256,
    /// The block being filled; never a whole block between calls.
    block: Vec<u8>,
    /// How many whole blocks came before `block`.
    index: u64,
}

impl Default for SparseDigest {
    fn default() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        SparseDigest {
            hasher,
            block: Vec::with_capacity(BLOCK),
            index: 0,
        }
    }
}

impl SparseDigest {
    /// Adds bytes read from the body.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.block.is_empty() && bytes.len() >= BLOCK {
                // Whole blocks straight from the caller's buffer, without a copy.
                let (block, rest) = bytes.split_at(BLOCK);
                self.add_block(block);
                bytes = rest;
                continue;
            }
            let take = (BLOCK - self.block.len()).min(bytes.len());
            self.block.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            self.flush_if_full();
        }
    }

    /// Adds `n` zero bytes (a hole) without feeding them anywhere: whole blocks are only
    /// counted, so this costs the same for a kilobyte as for a terabyte.
    pub fn zeros(&mut self, mut n: u64) {
        if !self.block.is_empty() {
            let take = ((BLOCK - self.block.len()) as u64).min(n);
            self.block.resize(self.block.len() + take as usize, 0);
            n -= take;
            self.flush_if_full();
            if n == 0 {
                return;
            }
        }
        self.index += n / BLOCK as u64;
        self.block.resize((n % BLOCK as u64) as usize, 0);
    }

    /// The digest as a blob's name.
    pub fn finish(mut self) -> String {
        let length = self.index * BLOCK as u64 + self.block.len() as u64;
        if !self.block.is_empty() {
            let last = std::mem::take(&mut self.block);
            self.add_block(&last);
        }
        self.hasher.update(length.to_be_bytes());
        format!("{NAME_PREFIX}{}", super::hex(&self.hasher.finalize()))
    }

    fn flush_if_full(&mut self) {
        if self.block.len() == BLOCK {
            let block = std::mem::take(&mut self.block);
            self.add_block(&block);
            self.block = block;
            self.block.clear();
        }
    }

    fn add_block(&mut self, block: &[u8]) {
        if !is_zero(block) {
            self.hasher.update(self.index.to_be_bytes());
            self.hasher.update(block);
        }
        self.index += 1;
    }
}

/// Whether every byte is zero, sixteen at a time.
fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// A blob's name as a document writes it: `(algorithm:hex, the plain SHA-256 if that
/// is what names it)`. Bodies stored before the sparse digest are named by the SHA-256
/// of their bytes, which documents go on showing as `sha256`.
pub fn shown(name: &str) -> (String, Option<&str>) {
    match name.strip_prefix(NAME_PREFIX) {
        Some(hex) => (format!("sparse-sha256:{hex}"), None),
        None => (format!("sha256:{name}"), Some(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in the module's comment, written out plainly over every byte.
    fn plain(bytes: &[u8]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        for (i, block) in bytes.chunks(BLOCK).enumerate() {
            if block.iter().any(|&b| b != 0) {
                hasher.update((i as u64).to_be_bytes());
                hasher.update(block);
            }
        }
        hasher.update((bytes.len() as u64).to_be_bytes());
        format!("{NAME_PREFIX}{}", crate::blobs::hex(&hasher.finalize()))
    }

    #[test]
    fn holes_and_bytes_in_any_pieces_give_the_plain_definition() {
        let mut body = vec![0u8; 5 * BLOCK + 1234];
        body[3] = 1;
        body[2 * BLOCK + 17] = 2;
        body[5 * BLOCK + 1000] = 3;
        // The same body fed as bytes and holes cut in several ways, aligned or not.
        let cuts: [&[(usize, bool)]; 4] = [
            &[(body.len(), false)],
            &[(4, false), (2 * BLOCK, true), (body.len(), false)],
            &[
                (10, false),
                (BLOCK + 5, true),
                (3 * BLOCK, false),
                (body.len(), false),
            ],
            &[
                (2 * BLOCK + 18, false),
                (5 * BLOCK + 999, true),
                (body.len(), false),
            ],
        ];
        for cut in cuts {
            let mut digest = SparseDigest::default();
            let mut at = 0;
            for &(end, hole) in cut {
                if hole {
                    assert!(body[at..end].iter().all(|&b| b == 0));
                    digest.zeros((end - at) as u64);
                } else {
                    for piece in body[at..end].chunks(7000) {
                        digest.update(piece);
                    }
                }
                at = end;
            }
            assert_eq!(digest.finish(), plain(&body), "{cut:?}");
        }
        // Lengths and places matter, not only the bytes that are not zero.
        assert_ne!(plain(&body), plain(&body[..body.len() - 1]));
        let mut moved = body.clone();
        moved.swap(3, BLOCK + 3);
        assert_ne!(plain(&body), plain(&moved));
        assert_ne!(plain(&[]), plain(&[0]));
    }

    #[test]
    fn a_terabyte_hole_is_only_counted() {
        let mut digest = SparseDigest::default();
        digest.update(b"boot");
        digest.zeros(1 << 40);
        digest.update(b"end");
        let name = digest.finish();
        assert!(name.starts_with(NAME_PREFIX) && name.len() == NAME_PREFIX.len() + 64);
        assert_eq!(
            shown(&name),
            (
                format!("sparse-sha256:{}", &name[NAME_PREFIX.len()..]),
                None
            )
        );
        let old = "ab".repeat(32);
        assert_eq!(shown(&old), (format!("sha256:{old}"), Some(old.as_str())));
    }
}

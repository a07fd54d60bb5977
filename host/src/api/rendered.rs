//! Answers rendered from the store, kept until the store's next write.
//!
//! Reading a record means a read transaction on the blocking pool (redb never runs on
//! the async runtime), and the hand-off to that pool and back costs more than the read
//! itself. A document kept here, tagged with the store's generation when it was read, is
//! answered from memory for as long as nothing has been written since: any committed
//! write makes every kept document stale at once, so none can outlive what it shows.
//! What the reader may see is still checked on every request, from what is kept with
//! the document.

use axum::body::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Documents kept at most; past it, stale ones are dropped, then all. Keys include the
/// request's base URL, so a client cycling Host headers cannot grow memory without bound.
const MAX_KEPT: usize = 4096;

/// A rendered document and what deciding who may read it needs.
pub struct Kept {
    /// The store's generation read before the record was.
    pub generation: u64,
    /// The environment the record belongs to.
    pub environment: u64,
    /// Its name, for routes nested under an environment.
    pub environment_name: String,
    pub body: Bytes,
}

#[derive(Default)]
pub struct Rendered {
    kept: Mutex<HashMap<String, Arc<Kept>>>,
}

impl Rendered {
    /// The document kept under `key`, if it was read at `generation` (the current one).
    pub fn get(&self, key: &str, generation: u64) -> Option<Arc<Kept>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.get(key)
            .filter(|k| k.generation == generation)
            .cloned()
    }

    /// Keeps `document` under `key` and hands it back.
    pub fn keep(&self, key: String, document: Kept) -> Arc<Kept> {
        let document = Arc::new(document);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX_KEPT && !kept.contains_key(&key) {
            let current = document.generation;
            kept.retain(|_, k| k.generation >= current);
            if kept.len() >= MAX_KEPT {
                kept.clear();
            }
        }
        kept.insert(key, document.clone());
        document
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(generation: u64, body: &'static str) -> Kept {
        Kept {
            generation,
            environment: 1,
            environment_name: "default".into(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn a_document_is_answered_only_at_the_generation_it_was_read() {
        let rendered = Rendered::default();
        rendered.keep("a".into(), document(3, "<a/>"));
        assert_eq!(
            rendered.get("a", 3).map(|k| k.body.clone()),
            Some(Bytes::from_static(b"<a/>"))
        );
        assert!(rendered.get("a", 4).is_none(), "a write came after it");
        assert!(rendered.get("b", 3).is_none());
    }

    #[test]
    fn it_stays_bounded() {
        let rendered = Rendered::default();
        for n in 0..MAX_KEPT + 10 {
            rendered.keep(format!("k{n}"), document(n as u64 / 100, "x"));
        }
        let kept = rendered.kept.lock().expect("not poisoned").len();
        assert!(kept <= MAX_KEPT, "{kept} kept");
        // The newest is always there.
        assert!(
            rendered
                .get(&format!("k{}", MAX_KEPT + 9), (MAX_KEPT as u64 + 9) / 100)
                .is_some()
        );
    }
}

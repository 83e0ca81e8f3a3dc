//! The provider API keys of a worker, used in order: a key the provider refuses is set aside and the next one used.

use std::sync::atomic::{AtomicBool, Ordering};

use secrecy::SecretString;

pub struct KeyRing {
    keys: Vec<(SecretString, String)>,
    /// The id used when there is no key at all (a local server).
    keyless_id: String,
    /// Keys the provider refused (401/403); never tried again by this worker.
    refused: Vec<AtomicBool>,
}

/// The key to use for a call: its index, the key (none if the worker has no
/// key at all) and its id for limits and logs.
pub struct Key<'a> {
    pub index: usize,
    pub secret: Option<&'a SecretString>,
    pub id: &'a str,
}

impl KeyRing {
    /// The keys of `provider`, in order.
    pub fn new(keys: Vec<SecretString>, provider: &str) -> Self {
        let keys: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let id = common::provider::key_id(&k);
                (k, id)
            })
            .collect();
        let refused = keys.iter().map(|_| AtomicBool::new(false)).collect();
        // Two keyless providers must not share limits; the shorthand's stays "none".
        let keyless_id =
            if provider == common::providers::SHORTHAND { "none".to_string() } else { format!("none-{provider}") };
        KeyRing { keys, keyless_id, refused }
    }

    /// The first key not refused; `None` when every key was refused.
    pub fn current(&self) -> Option<Key<'_>> {
        if self.keys.is_empty() {
            return Some(Key { index: 0, secret: None, id: &self.keyless_id });
        }
        self.keys
            .iter()
            .enumerate()
            .find(|(i, _)| !self.refused[*i].load(Ordering::Relaxed))
            .map(|(index, (secret, id))| Key { index, secret: Some(secret), id })
    }

    /// Sets a key aside after the provider refused it; true if another key is left.
    pub fn refuse(&self, index: usize) -> bool {
        if let Some(flag) = self.refused.get(index) {
            if !flag.swap(true, Ordering::Relaxed) {
                tracing::warn!(key_id = %self.keys[index].1, "the provider refused an API key; it will not be used again");
            }
        }
        !self.keys.is_empty() && self.current().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_keys_are_skipped_in_order() {
        let ring = KeyRing::new(vec![SecretString::from("a"), SecretString::from("b")], "default");
        assert_eq!(ring.current().unwrap().index, 0);
        assert!(ring.refuse(0));
        assert_eq!(ring.current().unwrap().index, 1);
        assert!(!ring.refuse(1));
        assert!(ring.current().is_none());
    }

    #[test]
    fn no_keys_means_unauthenticated_calls() {
        let ring = KeyRing::new(Vec::new(), "default");
        let k = ring.current().unwrap();
        assert!(k.secret.is_none());
        assert_eq!(k.id, "none");
        assert_eq!(KeyRing::new(Vec::new(), "local").current().unwrap().id, "none-local");
        assert!(!ring.refuse(0));
    }
}

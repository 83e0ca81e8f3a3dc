//! Read-modify-write of JSON state in NATS KV with compare-and-set, shared by the rate limiter and the circuit breakers.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use serde::{de::DeserializeOwned, Serialize};

use crate::Error;

/// Wall-clock milliseconds since the epoch: the time base all workers share.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Reads `key` (or `init(now)` when absent or unreadable), lets `f` change it,
/// and writes it back only if the key has not changed meanwhile, retrying on
/// conflict up to [`MAX_CONFLICTS`] times in a row. `f` returns whether there
/// is anything to write. Returns the state written, if any.
/// Conflicts in a row after which a compare-and-set gives up: far beyond what
/// any number of workers sharing a key produces, so only a fault ends there.
pub const MAX_CONFLICTS: usize = 100;

pub async fn modify<T, I, F>(store: &kv::Store, key: &str, init: I, mut f: F) -> Result<Option<T>, Error>
where
    T: Serialize + DeserializeOwned,
    I: Fn(u64) -> T,
    F: FnMut(&mut T, u64) -> bool,
{
    for _ in 0..MAX_CONFLICTS {
        let now = now_ms();
        let entry = store.entry(key.to_string()).await.map_err(|e| Error::Kv(Box::new(e)))?;
        let (mut state, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice(&e.value).unwrap_or_else(|_| init(now)), Some(e.revision))
            }
            _ => (init(now), None),
        };
        if !f(&mut state, now) {
            return Ok(None);
        }
        let bytes: bytes::Bytes = serde_json::to_vec(&state).expect("state serialises").into();
        let conflict = match revision {
            Some(rev) => match store.update(key, bytes, rev).await {
                Ok(_) => false,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => true,
                Err(e) => return Err(Error::Kv(Box::new(e))),
            },
            None => match store.create(key, bytes).await {
                Ok(_) => false,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => true,
                Err(e) => return Err(Error::Kv(Box::new(e))),
            },
        };
        if !conflict {
            return Ok(Some(state));
        }
    }
    Err(Error::Kv(format!("compare-and-set on {key} lost {MAX_CONFLICTS} times in a row").into()))
}

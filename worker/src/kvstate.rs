//! Read-modify-write of JSON state in NATS KV with compare-and-set, shared by the rate limiter and the circuit breakers.
//!
//! # A wire boundary
//!
//! The state in the `sluice_state` bucket is read and written by every
//! worker of a cluster, old and new versions side by side during a rolling
//! upgrade. Its types are a wire boundary like `common::wire`:
//! [`limit::Bucket`](crate::limit::Bucket) (with its `Dim`s),
//! [`breaker::BreakerState`](crate::breaker::BreakerState),
//! [`cap::CapState`](crate::cap::CapState) (with its `Holder`s) and
//! [`learned::Facts`](crate::learned::Facts). Change them only by adding
//! fields with `#[serde(default)]`; never rename or remove one. The test
//! below holds each type's JSON as it is today, so a rename fails it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use serde::{de::DeserializeOwned, Serialize};

use crate::Error;

/// Wall-clock milliseconds since the epoch: the time base all workers share.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Conflicts in a row after which a compare-and-set gives up: far beyond what
/// any number of workers sharing a key produces, so only a fault ends there.
pub const MAX_CONFLICTS: usize = 100;

/// The pause before trying again after the `n`th conflict in a row, by
/// `draw` (0 to 1): up to 2^(n+3) ms (16 ms after the first, at most 128),
/// or up to `span` x 2^(n-1) (at most 8 spans) if longer, never over a
/// second. `span` is how long the try that met the conflict took from its
/// read to its write's answer: the time the key was open to another's
/// write. Workers that met on one key then try again apart rather than
/// together: with 64 workers leasing from one bucket, retrying at once cost
/// seven conflicts per write, pauses of up to 2^n ms five to six, these
/// about three (0.09 conflicts per call against 0.19-0.26; `scripts/bench
/// scale --workers 64`). On a busy machine a try takes 20 to 90 ms, and a
/// pause of a few ms met the same crowd again.
pub fn conflict_pause(n: usize, draw: f64, span: Duration) -> Duration {
    let d = draw.clamp(0.0, 1.0);
    let most = Duration::from_millis(1u64 << (n + 3).min(7));
    let spans = span.saturating_mul(1u32 << n.saturating_sub(1).min(3));
    most.max(spans).mul_f64(d).min(Duration::from_secs(1))
}

/// A draw between 0 and 1, different in each worker and each time.
fn draw() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads `key` (or `init(now)` when absent or unreadable), lets `f` change it,
/// and writes it back only if the key has not changed meanwhile, retrying on
/// conflict up to [`MAX_CONFLICTS`] times in a row. `f` returns whether there
/// is anything to write. Returns the state written, if any.
/// `state` names the state for the request counter
/// ([`crate::metrics::STATE_REQUESTS`]): limiter, window, breaker, learned.
pub async fn modify<T, I, F>(
    store: &kv::Store,
    state: &'static str,
    key: &str,
    init: I,
    f: F,
) -> Result<Option<T>, Error>
where
    T: Serialize + DeserializeOwned,
    I: Fn(u64) -> T,
    F: FnMut(&mut T, u64) -> bool,
{
    match modify_within(store, state, key, init, f, MAX_CONFLICTS).await? {
        Modified::Written(v) => Ok(Some(v)),
        Modified::Unchanged => Ok(None),
        Modified::Yielded => {
            Err(Error::Kv(format!("compare-and-set on {key} lost {MAX_CONFLICTS} times in a row").into()))
        }
    }
}

/// What [`modify_or_yield`] did.
#[derive(Debug, PartialEq)]
pub enum Modified<T> {
    /// Wrote this state.
    Written(T),
    /// Had nothing to write.
    Unchanged,
    /// Another worker wrote the key between the read and the write.
    Yielded,
}

/// [`modify`], except that it gives way to another worker's write instead
/// of trying again, for news that can wait for the next turn: every try
/// after a conflict is another read and write on a key many workers share.
pub async fn modify_or_yield<T, I, F>(
    store: &kv::Store,
    state: &'static str,
    key: &str,
    init: I,
    f: F,
) -> Result<Modified<T>, Error>
where
    T: Serialize + DeserializeOwned,
    I: Fn(u64) -> T,
    F: FnMut(&mut T, u64) -> bool,
{
    modify_within(store, state, key, init, f, 1).await
}

async fn modify_within<T, I, F>(
    store: &kv::Store,
    state: &'static str,
    key: &str,
    init: I,
    mut f: F,
    tries: usize,
) -> Result<Modified<T>, Error>
where
    T: Serialize + DeserializeOwned,
    I: Fn(u64) -> T,
    F: FnMut(&mut T, u64) -> bool,
{
    // How long the last try took from its read to its write's answer.
    let mut span = Duration::ZERO;
    for attempt in 0..tries {
        if attempt > 0 {
            tokio::time::sleep(conflict_pause(attempt, draw(), span)).await;
        }
        let now = now_ms();
        let read_at = Instant::now();
        crate::metrics::state_request(state, "read");
        let entry = store.entry(key.to_string()).await.map_err(|e| Error::Kv(Box::new(e)))?;
        let (mut value, revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice(&e.value).unwrap_or_else(|_| init(now)), Some(e.revision))
            }
            _ => (init(now), None),
        };
        if !f(&mut value, now) {
            return Ok(Modified::Unchanged);
        }
        crate::metrics::state_request(state, "write");
        let bytes: bytes::Bytes = serde_json::to_vec(&value).expect("state serialises").into();
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
        span = read_at.elapsed();
        if !conflict {
            return Ok(Modified::Written(value));
        }
        crate::metrics::state_request(state, "conflict");
    }
    Ok(Modified::Yielded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_in_a_row_are_tried_again_apart() {
        let us = |d: Duration| d.as_micros();
        // conflicts in a row, draw, the last try's span in ms: the pause
        for (n, d, span, pause) in [
            (1, 1.0, 0, 16_000),
            (1, 0.5, 1, 8_000),
            (3, 1.0, 2, 64_000),
            (4, 1.0, 0, 128_000),
            (40, 1.0, 0, 128_000),
            (4, 0.0, 90, 0),
            // A slow try: the pause grows with it, at most 8 spans, a second.
            (1, 1.0, 60, 60_000),
            (1, 0.5, 60, 30_000),
            (2, 1.0, 60, 120_000),
            (4, 1.0, 60, 480_000),
            (9, 1.0, 60, 480_000),
            (4, 1.0, 200, 1_000_000),
        ] {
            assert_eq!(us(conflict_pause(n, d, Duration::from_millis(span))), pause, "{n} {d} {span}");
        }
        let draws: Vec<f64> = (0..100).map(|_| draw()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        assert!(draws.iter().any(|d| *d < 0.5) && draws.iter().any(|d| *d >= 0.5), "spread: {draws:?}");
    }
}

#[cfg(test)]
mod wire_tests {
    use crate::breaker::BreakerState;
    use crate::cap::CapState;
    use crate::learned::Facts;
    use crate::limit::Bucket;

    /// Today's JSON of every KV type, as this version writes it, decodes to
    /// the same values and is written back the same: a renamed, removed or
    /// newly required field fails here.
    #[test]
    fn stored_state_of_this_version_still_decodes() {
        fn same<T: serde::Serialize + serde::de::DeserializeOwned>(json: &str) -> T {
            let v: T = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap(), json);
            v
        }
        let dim = r#"{"level":1.5,"rate":600.0,"learned":true,"provider":12.0,"big_bucket":true,"leased":2.0}"#;
        let bucket: Bucket = same(&format!(
            r#"{{"at_ms":1,"dims":[{dim},{dim},{dim},{dim}],"paused_until_ms":2,"reported_ms":3,"confirmed_ms":4,"last_cut_ms":5,"announced":[6000.0,0.0,0.0,0.0]}}"#
        ));
        assert_eq!(
            (bucket.at_ms, bucket.dims[2].rate, bucket.dims[3].provider, bucket.last_cut_ms),
            (1, 600.0, Some(12.0), 5)
        );
        let breaker: BreakerState = same(r#"{"open":true,"failures":5,"opened_at_ms":7,"probe_at_ms":8}"#);
        assert!(breaker.open && breaker.probe_at_ms == 8);
        let cap: CapState = same(
            r#"{"holders":{"w1":{"held":2,"want":3,"expires_ms":9}},"window":8.0,"ssthresh":16.0,"last_cut_ms":10,"demand_ms":11}"#,
        );
        assert_eq!((cap.holders["w1"].want, cap.window, cap.demand_ms), (3, 8.0, 11));
        let facts: Facts = same(r#"{"output":"json_object","no_logprobs":true,"at_ms":12}"#);
        assert!(facts.output.is_some() && facts.no_logprobs && facts.at_ms == 12);
        // Fields added since the first version are optional in what older workers wrote.
        let old: CapState = serde_json::from_str(r#"{"holders":{}}"#).unwrap();
        assert_eq!(old.window, 0.0);
        let dim = r#"{"level":1.5,"rate":600.0,"learned":true,"provider":12.0,"leased":2.0}"#;
        let old: Bucket = serde_json::from_str(&format!(
            r#"{{"at_ms":1,"dims":[{dim},{dim},{dim},{dim}],"paused_until_ms":2,"reported_ms":3,"confirmed_ms":4,"last_cut_ms":5}}"#
        ))
        .unwrap();
        assert_eq!(old.announced, [0.0; 4]);
    }
}

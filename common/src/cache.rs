//! The response cache's key: a SHA-256 of everything that determines a model's answer, computed alike by workers and the coordinator.
//!
//! The key covers the models tried (as `provider/model`, resolved against
//! the providers file), the request parameters (temperature, max_tokens,
//! reasoning effort, samples), the rendered messages, the output schema and
//! the confidence settings. The rendered messages enter through their own
//! digest, so the coordinator can tell which prompts of a file are cached
//! from digests alone (`sluice estimate`), without the documents.
//!
//! The project is part of the key too: one project's answers never serve
//! another's, and the key alone identifies an entry (the table's primary
//! key: see migration 0012).
//!
//! Left out on purpose: the review threshold (applied to a cached answer
//! anew), the chunk size, the kind's name and description.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::spec::JobSpec;

/// Bumped when what the key covers changes, so old entries stop matching.
const VERSION: u32 = 2;

/// The digest of the messages one call sends: the system message, if any, and the rendered prompt.
pub fn prompt_digest(system: Option<&str>, prompt: &str) -> String {
    let mut h = Sha256::new();
    // Length-prefixed, so no two pairs of texts run together alike.
    for part in [system.unwrap_or(""), prompt] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update([system.is_some() as u8]);
    hex::encode(h.finalize())
}

/// What every key of one job shares: the resolved models and the kind's
/// settings, held as the hash state after them (each key then hashes only
/// its digest, not the schema again).
#[derive(Debug, Clone)]
pub struct KeyBase(Sha256);

impl KeyBase {
    /// `models`: the main model and the fallbacks, each as `provider/model`.
    pub fn new(project: &str, spec: &JobSpec, schema: &Value, models: &[String]) -> Self {
        let base = json!({
            "v": VERSION,
            "project": project,
            "models": models,
            "temperature": spec.temperature,
            "max_tokens": spec.max_tokens,
            "reasoning_effort": spec.reasoning_effort,
            "schema": schema,
            "answer_field": spec.answer_field,
            "labels": spec.labels,
            "confidence": spec.confidence,
            "confidence_field": spec.confidence_field,
            "samples": spec.samples,
            "max_output_bytes": spec.max_output_bytes,
        });
        KeyBase(Sha256::new_with_prefix(serde_json::to_vec(&base).expect("a JSON value serializes")))
    }

    /// The cache key of the call whose messages have `digest` ([`prompt_digest`]).
    pub fn key(&self, digest: &str) -> String {
        let mut h = self.0.clone();
        h.update(digest.as_bytes());
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        toml::from_str(
            r#"kind = "k"
               model = "m"
               max_tokens = 20
               answer_field = "label""#,
        )
        .unwrap()
    }

    #[test]
    fn every_part_that_shapes_the_answer_changes_the_key() {
        let schema = json!({"type": "object"});
        let models = vec!["p/m".to_string()];
        let d = prompt_digest(Some("sys"), "hello");
        let k = KeyBase::new("p", &spec(), &schema, &models).key(&d);
        assert_eq!(k, KeyBase::new("p", &spec(), &schema, &models).key(&d), "deterministic");
        let mut differ = vec![
            KeyBase::new("p", &spec(), &schema, &models).key(&prompt_digest(Some("sys"), "hello!")),
            KeyBase::new("p", &spec(), &schema, &models).key(&prompt_digest(None, "hello")),
            KeyBase::new("p", &spec(), &schema, &models).key(&prompt_digest(Some("sy"), "shello")),
            KeyBase::new("p", &spec(), &json!({"type": "array"}), &models).key(&d),
            KeyBase::new("p", &spec(), &schema, &["q/m".to_string()]).key(&d),
            KeyBase::new("another project", &spec(), &schema, &models).key(&d),
        ];
        for change in [
            |s: &mut JobSpec| s.temperature = 0.5,
            |s: &mut JobSpec| s.max_tokens = 21,
            |s: &mut JobSpec| s.labels = vec!["a".into()],
            |s: &mut JobSpec| s.confidence = vec![crate::spec::ConfidenceStrategy::Logprobs],
            |s: &mut JobSpec| s.samples = 7,
        ] {
            let mut s = spec();
            change(&mut s);
            differ.push(KeyBase::new("p", &s, &schema, &models).key(&d));
        }
        for (i, other) in differ.iter().enumerate() {
            assert_ne!(&k, other, "change {i} kept the key");
        }
        // Not part of the answer: the review threshold and the chunk size.
        let mut s = spec();
        s.confidence_threshold = 0.99;
        s.chunk_size = 3;
        assert_eq!(KeyBase::new("p", &s, &schema, &models).key(&d), k);
        // Keys outlive releases: this one was written by VERSION 2 as first
        // released, and a change that moves it must bump VERSION.
        assert_eq!(k, "60181fc7cb5a004aa2ecd0c39812ae430bb4e7fca7100d5b1322a68ccf2e0d36");
    }
}

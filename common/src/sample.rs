//! Deterministic synthetic documents with known answers, for demos, tests and benchmarks.
//!
//! The model simulator answers with [`best_label`], which recovers the label a
//! document was generated with, so a test knows every right answer in advance.

use serde_json::{json, Value};

/// Topic labels of the synthetic classification corpus, with words typical of each.
pub const TOPICS: &[(&str, &[&str])] = &[
    (
        "business",
        &["market", "shares", "profit", "revenue", "investors", "merger", "quarterly", "earnings", "bank", "retailer"],
    ),
    (
        "sports",
        &["match", "goal", "striker", "season", "coach", "tournament", "league", "champion", "referee", "stadium"],
    ),
    (
        "technology",
        &[
            "software",
            "chip",
            "startup",
            "cloud",
            "algorithm",
            "smartphone",
            "developers",
            "network",
            "robot",
            "encryption",
        ],
    ),
    (
        "politics",
        &[
            "election",
            "parliament",
            "minister",
            "senate",
            "campaign",
            "policy",
            "vote",
            "coalition",
            "governor",
            "treaty",
        ],
    ),
    (
        "health",
        &[
            "patients",
            "vaccine",
            "hospital",
            "doctors",
            "clinical",
            "disease",
            "therapy",
            "nutrition",
            "symptoms",
            "surgery",
        ],
    ),
];

const FILLER: &[&str] = &[
    "the",
    "a",
    "on",
    "in",
    "after",
    "during",
    "with",
    "new",
    "report",
    "said",
    "week",
    "city",
    "people",
    "today",
    "local",
    "latest",
    "officials",
    "according",
    "year",
    "plan",
    "group",
    "more",
    "than",
    "early",
];

/// The labels of [`TOPICS`], in order.
pub fn labels() -> Vec<String> {
    TOPICS.iter().map(|(l, _)| l.to_string()).collect()
}

/// SplitMix64: a tiny, well-known generator; enough for reproducible sample text.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Document `index` of the corpus for `seed`: `{"id", "text", "expected"}`.
/// The same seed and index always give the same document.
pub fn document(seed: u64, index: u64) -> Value {
    let mut rng = Rng(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    let topic = rng.below(TOPICS.len());
    let (label, words) = TOPICS[topic];
    // One distractor topic contributes fewer words than the true one.
    let other = (topic + 1 + rng.below(TOPICS.len() - 1)) % TOPICS.len();
    let strong = 5 + rng.below(4);
    let weak = rng.below(3);
    let filler = 15 + rng.below(25);
    let mut tokens: Vec<&str> = Vec::with_capacity(strong + weak + filler);
    tokens.extend((0..strong).map(|_| words[rng.below(words.len())]));
    tokens.extend((0..weak).map(|_| TOPICS[other].1[rng.below(TOPICS[other].1.len())]));
    tokens.extend((0..filler).map(|_| FILLER[rng.below(FILLER.len())]));
    // Fisher-Yates shuffle so topic words are spread through the text.
    for i in (1..tokens.len()).rev() {
        tokens.swap(i, rng.below(i + 1));
    }
    let mut text = tokens.join(" ");
    text.push('.');
    let mut chars = text.chars();
    let text: String = chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars).collect();
    json!({ "id": format!("doc-{:07}", index + 1), "text": text, "expected": label })
}

/// How strongly `text` speaks of `label`: its topic words plus the label itself.
pub fn score(text: &str, label: &str) -> usize {
    let vocab = TOPICS.iter().find(|(l, _)| l.eq_ignore_ascii_case(label)).map(|(_, w)| *w).unwrap_or(&[]);
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .filter(|w| w.eq_ignore_ascii_case(label) || vocab.iter().any(|v| v.eq_ignore_ascii_case(w)))
        .count()
}

/// The label among `candidates` that `text` speaks of most (the first on ties),
/// with its share of all label words as a crude probability.
pub fn best_label<'a>(text: &str, candidates: &'a [String]) -> Option<(&'a str, f64)> {
    let scores: Vec<usize> = candidates.iter().map(|c| score(text, c)).collect();
    let total: usize = scores.iter().sum();
    let (i, best) = scores.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    let p = if total == 0 { 1.0 / candidates.len() as f64 } else { *best as f64 / total as f64 };
    Some((candidates[i].as_str(), p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_deterministic() {
        assert_eq!(document(7, 42), document(7, 42));
        assert_ne!(document(7, 42), document(8, 42));
    }

    #[test]
    fn reference_classifier_recovers_every_label() {
        let labels = labels();
        for i in 0..5_000 {
            let doc = document(1, i);
            let (got, p) = best_label(doc["text"].as_str().unwrap(), &labels).unwrap();
            assert_eq!(got, doc["expected"], "doc {i}: {}", doc["text"]);
            assert!(p > 0.5 && p <= 1.0);
        }
    }

    #[test]
    fn all_topics_occur() {
        let seen: std::collections::HashSet<String> =
            (0..200).map(|i| document(3, i)["expected"].as_str().unwrap().to_string()).collect();
        assert_eq!(seen.len(), TOPICS.len());
    }

    #[test]
    fn no_label_words_gives_uniform_probability() {
        let labels = labels();
        let (first, p) = best_label("nothing relevant here", &labels).unwrap();
        assert_eq!(first, "business");
        assert!((p - 0.2).abs() < 1e-9);
    }
}

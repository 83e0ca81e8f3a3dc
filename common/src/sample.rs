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

/// The clause labels of the synthetic contracts (`jobs/contract-review`),
/// with words typical of each: a risky clause is full of its words, a
/// standard one carries a few of its own.
pub const CLAUSES: &[(&str, &[&str])] = &[
    (
        "risky",
        &[
            "indemnify",
            "unlimited",
            "penalty",
            "irrevocable",
            "exclusive",
            "waive",
            "perpetual",
            "forfeit",
            "unilaterally",
            "liquidated",
        ],
    ),
    ("standard", &["notice", "reasonable", "mutual", "customary", "confidential", "renewal", "payment", "written"]),
];

const CLAUSE_FILLER: &[&str] = &[
    "the",
    "party",
    "shall",
    "agreement",
    "under",
    "this",
    "any",
    "of",
    "to",
    "and",
    "by",
    "within",
    "days",
    "other",
    "services",
    "provider",
    "client",
    "terms",
    "as",
    "set",
    "out",
    "herein",
    "may",
    "be",
];

/// Contract `index` for `seed`: `{"id", "text", "expected", "risky_clauses"}`.
/// Between 6 and 12 clauses of about 250 bytes, as paragraphs; about a third
/// of the contracts have one or two risky clauses (`expected` is then
/// `risky`, else `standard`), whose numbers (from 1) are listed.
pub fn contract(seed: u64, index: u64) -> Value {
    let mut rng = Rng(seed ^ index.wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ 0xC0C0);
    let clauses = 6 + rng.below(7);
    let risky_count = if rng.below(3) == 0 { 1 + rng.below(2) } else { 0 };
    let mut risky: Vec<usize> = Vec::new();
    while risky.len() < risky_count {
        let c = rng.below(clauses);
        if !risky.contains(&c) {
            risky.push(c);
        }
    }
    risky.sort_unstable();
    let paragraphs: Vec<String> = (0..clauses)
        .map(|c| {
            let (words, count) =
                if risky.contains(&c) { (CLAUSES[0].1, 8 + rng.below(3)) } else { (CLAUSES[1].1, 1 + rng.below(2)) };
            let mut tokens: Vec<&str> = (0..count).map(|_| words[rng.below(words.len())]).collect();
            tokens.extend((0..30 + rng.below(8)).map(|_| CLAUSE_FILLER[rng.below(CLAUSE_FILLER.len())]));
            for i in (1..tokens.len()).rev() {
                tokens.swap(i, rng.below(i + 1));
            }
            format!("{}. {}.", c + 1, tokens.join(" "))
        })
        .collect();
    let expected = if risky.is_empty() { "standard" } else { "risky" };
    let numbers: Vec<usize> = risky.iter().map(|c| c + 1).collect();
    json!({"id": format!("contract-{:07}", index + 1), "text": paragraphs.join("\n\n"), "expected": expected,
           "risky_clauses": numbers})
}

/// Article brief `index` for `seed` (`jobs/article`): `{"id", "topic",
/// "sources", "words"}`, a topic of the classification corpus with two or
/// three source URLs and a length of 400 to 1,200 words.
pub fn brief(seed: u64, index: u64) -> Value {
    let mut rng = Rng(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0xB1EF);
    let (label, words) = TOPICS[rng.below(TOPICS.len())];
    let subject: Vec<&str> = (0..3).map(|_| words[rng.below(words.len())]).collect();
    let sources: Vec<String> = (0..2 + rng.below(2))
        .map(|s| format!("https://example.org/{label}/{}-{}", subject[s % 3], rng.below(1000)))
        .collect();
    json!({"id": format!("brief-{:07}", index + 1), "topic": format!("{label}: {}", subject.join(", ")),
           "sources": sources, "words": 400 + 100 * rng.below(9)})
}

/// How strongly `text` speaks of `label`: its topic words plus the label itself.
pub fn score(text: &str, label: &str) -> usize {
    scores(text, &[label])[0]
}

/// [`score`] of each label, in one pass over the words of `text` (the
/// simulator scores every label of every request, and a pass per label was
/// a good part of its time).
pub fn scores<S: AsRef<str>>(text: &str, labels: &[S]) -> Vec<usize> {
    // Each label's vocabulary: the first topic or clause of its name.
    let lower: Vec<String> = labels.iter().map(|l| l.as_ref().to_ascii_lowercase()).collect();
    let entries: Vec<Option<usize>> = labels
        .iter()
        .map(|l| TOPICS.iter().chain(CLAUSES).position(|(name, _)| name.eq_ignore_ascii_case(l.as_ref())))
        .collect();
    let index = vocabulary_index();
    let mut counts = vec![0; labels.len()];
    let mut word = String::new();
    for w in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        word.clear();
        word.push_str(w);
        word.make_ascii_lowercase();
        let in_entries = index.get(word.as_str()).map_or(&[][..], Vec::as_slice);
        for (i, count) in counts.iter_mut().enumerate() {
            if word == lower[i] || entries[i].is_some_and(|e| in_entries.contains(&e)) {
                *count += 1;
            }
        }
    }
    counts
}

/// Each vocabulary word (in lower case) and the topics and clauses, by
/// position in `TOPICS` then `CLAUSES`, whose vocabulary holds it.
fn vocabulary_index() -> &'static std::collections::HashMap<String, Vec<usize>> {
    static INDEX: std::sync::OnceLock<std::collections::HashMap<String, Vec<usize>>> = std::sync::OnceLock::new();
    INDEX.get_or_init(|| {
        let mut index: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (e, (_, words)) in TOPICS.iter().chain(CLAUSES).enumerate() {
            for w in *words {
                let entries = index.entry(w.to_ascii_lowercase()).or_default();
                if !entries.contains(&e) {
                    entries.push(e);
                }
            }
        }
        index
    })
}

/// The label among `candidates` that `text` speaks of most (the first on ties),
/// with its share of all label words as a crude probability.
pub fn best_label<'a>(text: &str, candidates: &'a [String]) -> Option<(&'a str, f64)> {
    let scores = scores(text, candidates);
    let total: usize = scores.iter().sum();
    let (i, best) = scores.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    let p = if total == 0 { 1.0 / candidates.len() as f64 } else { *best as f64 / total as f64 };
    Some((candidates[i].as_str(), p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition `scores` computes in one pass.
    fn score_by_definition(text: &str, label: &str) -> usize {
        let vocab =
            TOPICS.iter().chain(CLAUSES).find(|(l, _)| l.eq_ignore_ascii_case(label)).map(|(_, w)| *w).unwrap_or(&[]);
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .filter(|w| w.eq_ignore_ascii_case(label) || vocab.iter().any(|v| v.eq_ignore_ascii_case(w)))
            .count()
    }

    #[test]
    fn one_pass_scores_match_the_definition() {
        let mut labels = labels();
        labels.extend(["Sports".to_string(), "unknown".to_string()]);
        labels.extend(CLAUSES.iter().map(|(l, _)| l.to_string()));
        for i in 0..300 {
            let text = document(2, i)["text"].as_str().unwrap().to_string() + " SPORTS Business unknown";
            let want: Vec<usize> = labels.iter().map(|l| score_by_definition(&text, l)).collect();
            assert_eq!(scores(&text, &labels), want, "{text}");
        }
        for (_, words) in CLAUSES {
            let text = words.join(" ");
            let want: Vec<usize> = labels.iter().map(|l| score_by_definition(&text, l)).collect();
            assert_eq!(scores(&text, &labels), want, "{text}");
        }
    }

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
    fn contracts_are_risky_exactly_where_a_clause_is_and_each_clause_reads_as_its_label() {
        let labels: Vec<String> = CLAUSES.iter().map(|(l, _)| l.to_string()).collect();
        let mut risky = 0;
        for i in 0..300 {
            let c = contract(4, i);
            assert_eq!(c, contract(4, i));
            let clauses: Vec<&str> = c["text"].as_str().unwrap().split("\n\n").collect();
            assert!((6..=12).contains(&clauses.len()));
            let numbers: Vec<u64> =
                c["risky_clauses"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
            assert_eq!(c["expected"] == "risky", !numbers.is_empty());
            risky += usize::from(!numbers.is_empty());
            for (n, clause) in clauses.iter().enumerate() {
                let want = if numbers.contains(&(n as u64 + 1)) { "risky" } else { "standard" };
                assert_eq!(best_label(clause, &labels).unwrap().0, want, "{clause}");
            }
        }
        assert!((70..130).contains(&risky), "{risky} of 300 risky");
    }

    #[test]
    fn briefs_name_a_topic_sources_and_a_length() {
        let b = brief(2, 7);
        assert_eq!(b, brief(2, 7));
        assert!(b["sources"].as_array().unwrap().len() >= 2);
        assert!((400..=1200).contains(&b["words"].as_u64().unwrap()));
    }

    #[test]
    fn no_label_words_gives_uniform_probability() {
        let labels = labels();
        let (first, p) = best_label("nothing relevant here", &labels).unwrap();
        assert_eq!(first, "business");
        assert!((p - 0.2).abs() < 1e-9);
    }
}

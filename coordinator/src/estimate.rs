//! What a job will cost and take before it runs: every line validated as `submit` would, every prompt rendered and its tokens counted, priced at live and Batch API prices, timed by the configured rate limits. No model is called.
//!
//! Tokens are counted exactly for OpenAI models, with their own tokenizer
//! (`o200k_base` for the gpt-4o, gpt-4.1, gpt-5 and o-series families,
//! `cl100k_base` for gpt-4 and gpt-3.5; tiktoken-rs, offline) and OpenAI's
//! chat format: 3 tokens per message, 1 for its role, 3 priming the reply.
//! Other models get a documented approximation: 4 bytes a token over the
//! messages' text, plus one (what the project's simulator reports too).
//! Output tokens are counted at `max_tokens` per item: an upper bound.
//! The expected output is less: for a kind whose answer is one of fixed
//! labels and nothing else (`jobs/classify`), the JSON answer
//! `{"label":"…"}` counted like the prompt, averaged over the labels
//! ([`label_output_tokens`]); reasoning models and sampled answers stay at
//! `max_tokens`, their hidden tokens unknown.
//!
//! Expected figures go further when the job reuses answers (temperature 0,
//! unless `--no-cache`): identical prompts of the file make one call, and
//! prompts the coordinator's response cache holds make none (it is asked
//! with the prompts' digests, never the documents). Output tokens are then
//! the mean per item of the latest completed jobs of the same kind, model
//! and template, where there are any.

use std::collections::HashSet;
use std::io::Read;

use common::prices::PriceTable;
use common::providers::Catalog;
use common::spec::{JobKind, Prompt};
use serde::{Deserialize, Serialize};

use crate::ingest::{Checked, LineSplitter, Validator, MAX_REPORTED_ERRORS};
use crate::model::LineError;

/// How the tokens of a prompt are counted.
pub enum Counter {
    #[cfg(feature = "tokenizer")]
    Exact { encoding: &'static str, bpe: Box<tiktoken_rs::CoreBPE> },
    /// Four bytes a token, plus one a call.
    Approximate,
}

/// OpenAI's tokenizer of a model name (without the provider), if it has one.
pub fn encoding_of(model: &str) -> Option<&'static str> {
    let m = model.rsplit('/').next().unwrap_or(model);
    let o200k = ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];
    if o200k.iter().any(|p| m.starts_with(p)) {
        Some("o200k_base")
    } else if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") {
        Some("cl100k_base")
    } else {
        None
    }
}

impl Counter {
    /// The counter for `model`: exact where OpenAI's tokenizer applies and is built in.
    pub fn for_model(model: &str) -> Self {
        #[cfg(feature = "tokenizer")]
        {
            let bpe = match encoding_of(model) {
                Some("o200k_base") => tiktoken_rs::o200k_base().ok().map(|b| ("o200k_base", Box::new(b))),
                Some("cl100k_base") => tiktoken_rs::cl100k_base().ok().map(|b| ("cl100k_base", Box::new(b))),
                _ => None,
            };
            if let Some((encoding, bpe)) = bpe {
                return Counter::Exact { encoding, bpe };
            }
        }
        let _ = model;
        Counter::Approximate
    }

    /// How the count is made, for people.
    pub fn describe(&self) -> String {
        match self {
            #[cfg(feature = "tokenizer")]
            Counter::Exact { encoding, .. } => format!("{encoding}, exact"),
            Counter::Approximate => "approximation: 4 bytes a token".into(),
        }
    }

    /// Tokens of a text the model writes.
    pub fn text(&self, text: &str) -> u64 {
        match self {
            #[cfg(feature = "tokenizer")]
            Counter::Exact { bpe, .. } => bpe.encode_ordinary(text).len() as u64,
            Counter::Approximate => text.len() as u64 / 4 + 1,
        }
    }

    /// Input tokens of one call with these messages (the system message, if
    /// any, then the rendered prompt).
    pub fn chat(&self, system: Option<&str>, prompt: &str) -> u64 {
        let messages = system.into_iter().chain([prompt]);
        match self {
            #[cfg(feature = "tokenizer")]
            Counter::Exact { bpe, .. } => {
                messages.map(|m| 3 + 1 + bpe.encode_ordinary(m).len() as u64).sum::<u64>() + 3
            }
            Counter::Approximate => messages.map(|m| m.len() as u64).sum::<u64>() / 4 + 1,
        }
    }
}

/// The estimate of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The model as the providers file resolves it (`provider/model`), or as the kind names it.
    pub model: String,
    pub items: u64,
    pub invalid_lines: u64,
    /// The first invalid lines, as `submit` reports them.
    pub errors: Vec<LineError>,
    pub input_tokens: u64,
    /// How input tokens were counted.
    pub tokenizer: String,
    /// `max_tokens` for every item: what the job can use at most.
    pub output_tokens_at_most: u64,
    /// At live prices, and through the provider's Batch API (None: no price).
    pub cost_usd_at_most: Option<f64>,
    pub batch_cost_usd_at_most: Option<f64>,
    /// The price table's date.
    pub prices_as_of: Option<String>,
    /// Requests and tokens per minute configured for the model (0: none).
    pub rpm: f64,
    pub tpm: f64,
    /// Seconds the limits imply at least for the whole job (None: no limit configured).
    pub duration_s_at_least: Option<f64>,
    /// Whether the job would reuse answers (cache and identical items).
    pub reuse: bool,
    /// Distinct prompts among the items.
    pub distinct: u64,
    /// Of the distinct prompts, those the response cache answers (None: not asked).
    pub cache_hits: Option<u64>,
    /// Usage of earlier jobs of the kind, when the coordinator knows some.
    pub history: Option<crate::cache::History>,
    /// Calls the job is expected to make: one per item, or per distinct
    /// uncached prompt when it reuses answers.
    pub calls: u64,
    pub input_tokens_expected: u64,
    /// Per call: the mean of earlier jobs when known, else what a label
    /// answer takes, else `max_tokens`; `output_basis` says which.
    pub output_tokens_expected: u64,
    pub output_basis: OutputBasis,
    pub cost_usd_expected: Option<f64>,
    pub batch_cost_usd_expected: Option<f64>,
    /// The digest and input tokens of each distinct prompt, in file order.
    #[serde(skip)]
    pub prompts: Vec<(String, u64)>,
    #[serde(skip)]
    price_key: (String, String),
    /// Output tokens of a label answer ([`label_output_tokens`]).
    #[serde(skip)]
    label_output: Option<f64>,
}

/// Where the expected output tokens per call come from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputBasis {
    /// Measured over the latest completed jobs of the kind.
    History,
    /// The JSON answer of a mean label.
    Labels,
    /// `max_tokens`: nothing better is known.
    MaxTokens,
}

/// Output tokens of an answer that is one of the kind's labels and nothing
/// else, averaged over the labels: `{"label":"sports"}` as models write it
/// under a JSON schema. None when the answer may be anything else, samples
/// several answers (`agreement`), or comes from a reasoning model, whose
/// reasoning tokens are billed as output and cannot be foreseen.
pub fn label_output_tokens(kind: &JobKind, counter: &Counter, reasoning: bool) -> Option<f64> {
    let spec = &kind.spec;
    let properties = kind.schema.get("properties")?.as_object()?;
    let only_the_answer = properties.len() == 1 && properties.contains_key(&spec.answer_field);
    let sampled = spec.confidence.contains(&common::spec::ConfidenceStrategy::Agreement);
    if spec.labels.is_empty() || !only_the_answer || sampled || reasoning {
        return None;
    }
    let tokens = spec.labels.iter().map(|l| counter.text(&serde_json::json!({ &spec.answer_field: l }).to_string()));
    Some(tokens.sum::<u64>() as f64 / spec.labels.len() as f64)
}

impl Estimate {
    /// Recomputes the expected figures from what the coordinator said
    /// (`None`: not asked, so no cache hits are assumed).
    pub fn expect(&mut self, report: Option<&crate::cache::LookupReport>, prices: &PriceTable, max_tokens: u32) {
        let cached: HashSet<u32> = report.map(|r| r.cached.iter().copied().collect()).unwrap_or_default();
        self.cache_hits = report.map(|r| r.cache_hits);
        self.history = report.and_then(|r| r.history.clone());
        let (calls, input) = if self.reuse {
            let called = self.prompts.iter().enumerate().filter(|(i, _)| !cached.contains(&(*i as u32)));
            called.fold((0u64, 0u64), |(n, t), (_, (_, tokens))| (n + 1, t + tokens))
        } else {
            (self.items, self.input_tokens)
        };
        let (per_call, basis) = match (&self.history, self.label_output) {
            (Some(h), _) => (h.tokens_out_per_item, OutputBasis::History),
            (None, Some(t)) => (t.min(max_tokens as f64), OutputBasis::Labels),
            (None, None) => (max_tokens as f64, OutputBasis::MaxTokens),
        };
        self.output_basis = basis;
        self.calls = calls;
        self.input_tokens_expected = input;
        self.output_tokens_expected = (calls as f64 * per_call).round() as u64;
        let (live, batch) = price(prices, &self.price_key, input, self.output_tokens_expected);
        self.cost_usd_expected = live;
        self.batch_cost_usd_expected = batch;
    }
}

/// Dollars at live and at Batch API prices.
fn price(
    prices: &PriceTable,
    (provider, name): &(String, String),
    input: u64,
    output: u64,
) -> (Option<f64>, Option<f64>) {
    let price = prices.get(provider, name);
    let per_m = 1_000_000.0;
    let cost = price.map(|p| (input as f64 * p.input_per_mtok + output as f64 * p.output_per_mtok) / per_m);
    let batch = price.and_then(|p| {
        Some((input as f64 * p.batch_input_per_mtok? + output as f64 * p.batch_output_per_mtok?) / per_m)
    });
    (cost, batch)
}

#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    #[error("cannot read the input")]
    Read(#[source] std::io::Error),
    #[error("invalid prompt template")]
    Template(#[source] common::spec::SpecError),
    #[error("line {line}: cannot render the prompt: {reason}")]
    Render { line: u64, reason: String },
    #[error("{0}")]
    Model(String),
    #[error("the input is empty: no JSONL lines found")]
    Empty,
}

/// Estimates `kind` on `input`: reads it once, keeping one line and the
/// digest of each distinct prompt in memory. `reuse`: whether the job would
/// reuse answers. The expected figures assume no cache hits until
/// [`Estimate::expect`] is given the coordinator's answer.
pub fn estimate(
    kind: &JobKind,
    mut input: impl Read,
    catalog: &Catalog,
    prices: &PriceTable,
    reuse: bool,
) -> Result<Estimate, EstimateError> {
    let spec = &kind.spec;
    let (model, provider, name, rpm, tpm, reasoning) = if catalog.providers.is_empty() {
        (spec.model.clone(), String::new(), spec.model.clone(), 0.0, 0.0, false)
    } else {
        let t = catalog.resolve(&spec.model).map_err(EstimateError::Model)?;
        (t.reference(), t.provider.to_string(), t.model.to_string(), t.config.rpm, t.config.tpm, t.config.reasoning)
    };
    let counter = Counter::for_model(&name);
    let prompt = Prompt::new(kind).map_err(EstimateError::Template)?;
    let mut validator = Validator::new(spec);
    let mut splitter = LineSplitter::default();
    let (mut items, mut invalid, mut line_no, mut input_tokens) = (0u64, 0u64, 0u64, 0u64);
    let mut errors = Vec::new();
    let mut failure = None;
    let (mut seen, mut prompts) = (HashSet::new(), Vec::new());
    let mut on_line = |raw| {
        line_no += 1;
        match validator.check(raw) {
            Checked::Good(good) => match prompt.render(&good.payload) {
                Ok(text) => {
                    items += 1;
                    let tokens = counter.chat(spec.system.as_deref(), &text);
                    input_tokens += tokens;
                    let digest = common::cache::prompt_digest(spec.system.as_deref(), &text);
                    if seen.insert(digest.clone()) {
                        prompts.push((digest, tokens));
                    }
                }
                Err(e) if failure.is_none() => {
                    failure = Some(EstimateError::Render { line: line_no, reason: e.to_string() })
                }
                Err(_) => {}
            },
            Checked::Blank => {}
            Checked::Bad(_, reason) => {
                invalid += 1;
                if errors.len() < MAX_REPORTED_ERRORS {
                    errors.push(LineError { line: line_no, reason });
                }
            }
        }
    };
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(EstimateError::Read)?;
        if n == 0 {
            break;
        }
        splitter.feed(&buf[..n], &mut on_line);
    }
    splitter.finish(&mut on_line);
    if let Some(f) = failure {
        return Err(f);
    }
    if items == 0 && invalid == 0 {
        return Err(EstimateError::Empty);
    }
    let output = items * spec.max_tokens as u64;
    let price_key = (provider, name);
    let (cost, batch) = price(prices, &price_key, input_tokens, output);
    let by_requests = (rpm > 0.0).then(|| items as f64 / (rpm / 60.0));
    let by_tokens = (tpm > 0.0).then(|| (input_tokens + output) as f64 / (tpm / 60.0));
    let duration = match (by_requests, by_tokens) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut e = Estimate {
        model,
        items,
        invalid_lines: invalid,
        errors,
        input_tokens,
        tokenizer: counter.describe(),
        output_tokens_at_most: output,
        cost_usd_at_most: cost,
        batch_cost_usd_at_most: batch,
        prices_as_of: prices.as_of.clone(),
        rpm,
        tpm,
        duration_s_at_least: duration,
        reuse,
        distinct: prompts.len() as u64,
        cache_hits: None,
        history: None,
        calls: 0,
        input_tokens_expected: 0,
        output_tokens_expected: 0,
        output_basis: OutputBasis::MaxTokens,
        cost_usd_expected: None,
        batch_cost_usd_expected: None,
        prompts,
        price_key,
        label_output: label_output_tokens(kind, &counter, reasoning),
    };
    e.expect(None, prices, spec.max_tokens);
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_get_their_own_tokenizer() {
        for (model, enc) in [
            ("gpt-4o-mini", Some("o200k_base")),
            ("openai/gpt-5-mini", Some("o200k_base")),
            ("o4-mini", Some("o200k_base")),
            ("gpt-4.1-nano", Some("o200k_base")),
            ("gpt-4-turbo", Some("cl100k_base")),
            ("gpt-3.5-turbo", Some("cl100k_base")),
            ("claude-haiku-4-5", None),
            ("sim-small", None),
        ] {
            assert_eq!(encoding_of(model), enc, "{model}");
        }
    }

    /// Expected counts computed apart, with GitHub's bpe-openai tokenizer
    /// (another implementation of the same vocabularies).
    #[cfg(feature = "tokenizer")]
    #[test]
    fn exact_counts_match_an_independent_tokenizer() {
        let o200k = Counter::for_model("gpt-4o-mini");
        assert_eq!(o200k.describe(), "o200k_base, exact");
        let Counter::Exact { bpe, .. } = &o200k else { panic!("not exact") };
        assert_eq!(bpe.encode_ordinary("Hello, world!").len(), 4);
        assert_eq!(bpe.encode_ordinary("The quick brown fox jumps over the lazy dog.").len(), 10);
        // Two messages: (3 + 1 + 4) + (3 + 1 + 10) + 3.
        assert_eq!(o200k.chat(Some("Hello, world!"), "The quick brown fox jumps over the lazy dog."), 25);
        // One message: 3 + 1 + 4 + 3.
        assert_eq!(Counter::for_model("gpt-4").chat(None, "Hello, world!"), 11);
    }

    #[test]
    fn a_label_answer_is_counted_as_its_json() {
        let kind =
            |name: &str| JobKind::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs").join(name));
        let classify = kind("classify").unwrap();
        let c = Counter::for_model("sim-small");
        // {"label":"business"} is 20 bytes: 6 tokens; sports 5, technology 6, politics 6, health 5.
        assert_eq!(label_output_tokens(&classify, &c, false), Some(28.0 / 5.0));
        assert_eq!(label_output_tokens(&classify, &c, true), None, "a reasoning model");
        let mut sampled = classify.clone();
        sampled.spec.confidence = vec![common::spec::ConfidenceStrategy::Agreement];
        assert_eq!(label_output_tokens(&sampled, &c, false), None, "several answers a call");
        assert_eq!(label_output_tokens(&kind("summarize").unwrap(), &c, false), None, "free text");
    }

    #[test]
    fn other_models_are_approximated_as_the_simulator_counts() {
        let c = Counter::for_model("sim-small");
        assert_eq!(c.describe(), "approximation: 4 bytes a token");
        // 13 + 44 bytes: 57 / 4 + 1.
        assert_eq!(c.chat(Some("Hello, world!"), "The quick brown fox jumps over the lazy dog."), 15);
    }
}

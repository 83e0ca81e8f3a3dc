//! Job kinds as data: `job.toml`, a prompt template and an output schema, loaded from a folder under `jobs/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The values of `reasoning_effort` the OpenAI API accepts: the
/// `ReasoningEffort` enum of its OpenAPI specification (openai/openai-openapi,
/// "Currently supported values are `none`, `minimal`, `low`, `medium`,
/// `high`, and `xhigh`"); a model may take fewer, which only it can say.
pub const REASONING_EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];

/// The highest `temperature` any dialect accepts: OpenAI's chat completions
/// take 0 to 2; Anthropic's Messages API takes 0 to 1, checked where the
/// provider is known (`coordinator::api::check_models`).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// The contents of a job kind's `job.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Name of the kind, e.g. `classify`.
    pub kind: String,
    #[serde(default)]
    pub description: String,
    /// The model: `provider/model` as named in the providers file, or a
    /// model name only one configured provider offers.
    pub model: String,
    #[serde(default)]
    pub temperature: f32,
    pub max_tokens: u32,
    /// Items per chunk message.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// Results below this confidence are flagged for review.
    #[serde(default = "default_threshold")]
    pub confidence_threshold: f64,
    /// Prompt template file, relative to the kind's folder.
    #[serde(default = "default_template")]
    pub template: String,
    /// JSON schema of the model's output, relative to the kind's folder.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Optional system message sent before the rendered prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Fields every input line must carry (they are what the template uses).
    #[serde(default)]
    pub input_fields: Vec<String>,
    /// The output field that holds the short answer (a label, a summary).
    pub answer_field: String,
    /// Allowed labels for classification kinds; available to the template as `labels`.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Models tried in order when the main one keeps failing (server errors,
    /// an open breaker, or a request it refuses, e.g. too long a context).
    #[serde(default)]
    pub fallback_models: Vec<String>,
    /// How each result's confidence is computed: one strategy, or several in
    /// order of preference (`["logprobs", "agreement"]`): when the provider
    /// cannot give what one needs (no log-probabilities), the next is used.
    #[serde(default, deserialize_with = "one_or_many")]
    pub confidence: Vec<ConfidenceStrategy>,
    /// `reasoning_effort` for models that take it (`low`, `medium`, `high`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// With `self_reported`: the output field holding the model's own confidence.
    #[serde(default = "default_confidence_field")]
    pub confidence_field: String,
    /// With `agreement`: answers sampled per item (`n` in the request).
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// Longest accepted model output, in bytes.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Longest rendered prompt sent to a model, in bytes (the system message
    /// included). An item over it fails with `prompt_too_large` before any
    /// call: an oversized document would otherwise be paid for, held in a
    /// worker's memory and stored in the audit trail, once per attempt.
    #[serde(default = "default_max_prompt_bytes")]
    pub max_prompt_bytes: usize,
    /// What an input line holds and how it becomes a request.
    #[serde(default, skip_serializing_if = "RequestSource::is_template")]
    pub request: RequestSource,
    /// How jobs of this kind make their calls unless `submit --mode` says
    /// otherwise: `live` (the default), `batch` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::state::JobMode>,
    /// A multi-stage kind's stages, in order (`crate::stages`); empty for a
    /// kind of one prompt per item.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<crate::stages::StageSpec>,
}

/// Where a call's request comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestSource {
    /// The kind's prompt template renders each line into a user message.
    #[default]
    Template,
    /// Each line is a request of an OpenAI Batch API input file
    /// (`{"custom_id", "method", "url", "body"}`,
    /// <https://platform.openai.com/docs/api-reference/batch/request-input>),
    /// and its `body` is sent as it is, with `model` named as the job's
    /// provider names the job's model. The kind needs no template or schema:
    /// the body's own `response_format`, if any, is what answers are checked
    /// against.
    OpenaiBatch,
}

impl RequestSource {
    fn is_template(&self) -> bool {
        *self == RequestSource::Template
    }
}

/// How confidence is computed; recorded with its components in every result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceStrategy {
    /// No confidence: results are never flagged for review.
    #[default]
    None,
    /// The probability the model gave the chosen label, normalised over the
    /// allowed labels (from `top_logprobs`).
    Logprobs,
    /// A confidence field in the model's output, clamped and discounted.
    SelfReported,
    /// Several sampled answers: the share that agree with the majority.
    Agreement,
}

/// A strategy or a list of them.
pub(crate) fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ConfidenceStrategy>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(ConfidenceStrategy),
        Many(Vec<ConfidenceStrategy>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl JobSpec {
    /// The strategies in order, `none` left out.
    pub fn strategies(&self) -> impl Iterator<Item = ConfidenceStrategy> + '_ {
        self.confidence.iter().copied().filter(|s| *s != ConfidenceStrategy::None)
    }

    /// True when results get a confidence at all (and so may go to review).
    pub fn scores_confidence(&self) -> bool {
        self.strategies().next().is_some()
    }

    /// Models in order of use: the main one, then the fallbacks.
    pub fn models(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.model).chain(self.fallback_models.iter())
    }

    /// The fields every input line must carry, which are also all the prompt
    /// depends on (identical items are found by them): an OpenAI Batch line's
    /// `body`, or the template's `input_fields`.
    pub fn required_fields(&self) -> Vec<String> {
        match self.request {
            RequestSource::OpenaiBatch => vec!["body".into()],
            RequestSource::Template => self.input_fields.clone(),
        }
    }

    /// Whether a job of this kind reuses answers unless told otherwise:
    /// at temperature 0 only (a sampled answer is not meant to repeat).
    pub fn reuses_answers(&self) -> bool {
        self.temperature == 0.0
    }
}

fn default_confidence_field() -> String {
    "confidence".into()
}
fn default_samples() -> u32 {
    5
}
fn default_max_output_bytes() -> usize {
    16 * 1024
}
/// 512 KiB: about 128,000 tokens of English, the context of the largest
/// common models.
fn default_max_prompt_bytes() -> usize {
    512 * 1024
}

fn default_chunk_size() -> u32 {
    100
}
fn default_threshold() -> f64 {
    0.7
}
fn default_template() -> String {
    "prompt.j2".into()
}
fn default_schema() -> String {
    "schema.json".into()
}

/// A job kind with its template and schema read from disk, ready to submit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobKind {
    pub spec: JobSpec,
    pub template: String,
    pub schema: Value,
    /// Each stage's template and schema (a multi-stage kind).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_files: Vec<crate::stages::StageFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid job spec {path}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid JSON in output schema {path}")]
    SchemaJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("output schema is not a valid JSON schema: {0}")]
    Schema(String),
    #[error("prompt template does not compile")]
    Template(#[source] minijinja::Error),
    #[error("job spec: {0}")]
    Invalid(String),
}

/// Several problems of a kind at once, as one error (none: `Ok`).
fn problems_to_error(problems: Vec<String>) -> Result<(), SpecError> {
    match problems.len() {
        0 => Ok(()),
        1 => Err(SpecError::Invalid(problems.into_iter().next().unwrap_or_default())),
        n => Err(SpecError::Invalid(format!("{n} problems:\n  - {}", problems.join("\n  - ")))),
    }
}

/// What is wrong between a kind's `answer_field`, its `labels` and the
/// output schema (`at` names the schema's file, and the stage): each
/// problem names the field and the fix. Checked before any call: an
/// answer field missing from the schema failed every item after it was
/// paid for, and labels the schema spells otherwise (`Positive` against
/// `positive`) gave every answer confidence 1.0 and sent none to review.
/// A schema without `properties` (free-form) is not checked.
pub fn answer_problems(answer_field: &str, labels: &[String], schema: &Value, at: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return problems };
    let Some(field) = props.get(answer_field) else {
        problems.push(format!(
            "answer_field = {answer_field:?} (job.toml) is not among the properties of {at} ({}): name the field \
             that holds the short answer, or add it to the schema",
            props.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
        return problems;
    };
    let required = schema.get("required").and_then(Value::as_array);
    if !required.is_some_and(|r| r.iter().any(|f| f.as_str() == Some(answer_field))) {
        problems.push(format!(
            "answer_field = {answer_field:?} (job.toml) is not in \"required\" of {at}: an answer without it \
             passes the schema and then fails, paid for; add {answer_field:?} to \"required\""
        ));
    }
    let allowed: Option<Vec<&str>> =
        field.get("enum").and_then(Value::as_array).map(|e| e.iter().filter_map(Value::as_str).collect());
    if let (false, Some(allowed)) = (labels.is_empty(), allowed) {
        let sorted = |v: Vec<String>| {
            let mut v = v;
            v.sort();
            v
        };
        let ours = sorted(labels.to_vec());
        let theirs = sorted(allowed.iter().map(|s| s.to_string()).collect());
        let lower = |v: &[String]| sorted(v.iter().map(|s| s.to_lowercase()).collect());
        if ours != theirs {
            let hint = if lower(&ours) == lower(&theirs) {
                format!("they differ only in case: spell them as the schema does, labels = [{}]", quoted(&allowed))
            } else {
                "make them the same list".to_string()
            };
            problems.push(format!(
                "labels = [{}] (job.toml) are not the enum of {answer_field:?} in {at} ([{}]): confidence is \
                 scored over the labels and review accepts only them; {hint}",
                quoted(labels),
                quoted(&allowed)
            ));
        }
    }
    problems
}

/// Names quoted and joined with commas, as job.toml writes a list.
fn quoted(names: &[impl AsRef<str>]) -> String {
    names.iter().map(|s| format!("{:?}", s.as_ref())).collect::<Vec<_>>().join(", ")
}

impl JobKind {
    /// Reads `dir/job.toml` and the template and schema it names.
    pub fn load(dir: &Path) -> Result<Self, SpecError> {
        let spec_path = dir.join("job.toml");
        let text = read(&spec_path)?;
        let spec: JobSpec =
            toml::from_str(&text).map_err(|source| SpecError::Toml { path: spec_path.clone(), source })?;
        let (template, schema) = match spec.request {
            // The body is the request: nothing to render, and answers are
            // checked against the body's own response_format.
            RequestSource::OpenaiBatch => (String::new(), serde_json::json!({})),
            // A multi-stage kind's template and schema are its last stage's
            // (set below): that stage's answer is the item's result.
            RequestSource::Template if !spec.stages.is_empty() => (String::new(), Value::Null),
            RequestSource::Template => {
                let template = read(&dir.join(&spec.template))?;
                let schema_path = dir.join(&spec.schema);
                let schema = serde_json::from_str(&read(&schema_path)?)
                    .map_err(|source| SpecError::SchemaJson { path: schema_path, source })?;
                (template, schema)
            }
        };
        let mut stage_files = Vec::with_capacity(spec.stages.len());
        for stage in &spec.stages {
            let template = stage.template.as_ref().map(|t| read(&dir.join(t))).transpose()?.unwrap_or_default();
            let schema = match &stage.schema {
                Some(file) => {
                    let path = dir.join(file);
                    serde_json::from_str(&read(&path)?).map_err(|source| SpecError::SchemaJson { path, source })?
                }
                None => Value::Null,
            };
            stage_files.push(crate::stages::StageFiles { template, schema });
        }
        let (template, schema) = match stage_files.last() {
            Some(last) => (last.template.clone(), last.schema.clone()),
            None => (template, schema),
        };
        let kind = JobKind { spec, template, schema, stage_files };
        kind.validate()?;
        Ok(kind)
    }

    /// Checks everything that can be checked before any input is read.
    pub fn validate(&self) -> Result<(), SpecError> {
        let s = &self.spec;
        if s.chunk_size == 0 || s.chunk_size > 10_000 {
            return Err(SpecError::Invalid(format!("chunk_size must be 1..=10000, got {}", s.chunk_size)));
        }
        if !(0.0..=1.0).contains(&s.confidence_threshold) {
            return Err(SpecError::Invalid(format!(
                "confidence_threshold must be within 0..=1, got {}",
                s.confidence_threshold
            )));
        }
        if s.confidence.contains(&ConfidenceStrategy::Agreement) && !(2..=20).contains(&s.samples) {
            return Err(SpecError::Invalid(format!("samples must be 2..=20 for agreement, got {}", s.samples)));
        }
        if s.confidence.contains(&ConfidenceStrategy::Logprobs) && s.labels.is_empty() {
            return Err(SpecError::Invalid("confidence = \"logprobs\" needs `labels`".into()));
        }
        if s.max_tokens == 0 {
            return Err(SpecError::Invalid("max_tokens must be at least 1".into()));
        }
        if s.max_prompt_bytes == 0 {
            return Err(SpecError::Invalid("max_prompt_bytes must be at least 1".into()));
        }
        if let Some(effort) = s.reasoning_effort.as_deref() {
            if !REASONING_EFFORTS.contains(&effort) {
                return Err(SpecError::Invalid(format!(
                    "reasoning_effort = {effort:?} is not a value providers accept ({}): every call would be \
                     refused; fix it in job.toml",
                    REASONING_EFFORTS.join(", ")
                )));
            }
        }
        if !(0.0..=MAX_TEMPERATURE).contains(&s.temperature) {
            return Err(SpecError::Invalid(format!(
                "temperature = {} is outside 0..={MAX_TEMPERATURE}, the range providers accept: fix it in job.toml",
                s.temperature
            )));
        }
        self.validator()?;
        if !s.stages.is_empty() {
            if s.request == RequestSource::OpenaiBatch {
                return Err(SpecError::Invalid("request = \"openai_batch\" takes no stages".into()));
            }
            crate::stages::validate(&s.stages, &self.stage_files, &s.input_fields, &s.confidence)?;
            let mut problems = Vec::new();
            for i in 0..s.stages.len() {
                let stage = self.stage_kind(i);
                stage.validator()?;
                let at = format!("stages[{i}] ({}): {}", s.stages[i].name, stage.spec.schema);
                problems.extend(answer_problems(&stage.spec.answer_field, &s.labels, &stage.schema, &at));
            }
            return problems_to_error(problems);
        }
        if s.request == RequestSource::OpenaiBatch {
            if s.scores_confidence() {
                return Err(SpecError::Invalid(
                    "request = \"openai_batch\" sends each body as it is, so no confidence strategy can be \
                     applied: set confidence = \"none\""
                        .into(),
                ));
            }
            return Ok(());
        }
        let mut problems = answer_problems(&s.answer_field, &s.labels, &self.schema, &s.schema);
        let prompt = Prompt::new(self)?;
        let unread = prompt.unread_fields(&s.input_fields);
        if !unread.is_empty() {
            problems.push(format!(
                "input_fields declares {} but the prompt template ({}) never reads {}: every input line must \
                 carry it for nothing; take it out of input_fields in job.toml, or use it in the template",
                unread.join(", "),
                s.template,
                if unread.len() == 1 { "it" } else { "them" }
            ));
        }
        let unknown = prompt.undeclared_fields(&s.input_fields);
        if !unknown.is_empty() {
            problems.push(format!(
                "the prompt template uses {} but input_fields declares only [{}]: add them to input_fields in \
                 job.toml (every input line is then checked for them at upload) or take them out of the template",
                unknown.join(", "),
                s.input_fields.join(", ")
            ));
        }
        problems_to_error(problems)
    }

    /// Stage `i` of a multi-stage kind as a kind of its own: the stage's
    /// template and schema, and the kind's settings with the stage's
    /// overrides (model, confidence, threshold, answer field, max_tokens).
    /// A stage naming its own model takes none of the kind's fallbacks.
    pub fn stage_kind(&self, i: usize) -> JobKind {
        let stage = &self.spec.stages[i];
        let files = self.stage_files.get(i).cloned().unwrap_or_default();
        let mut spec = self.spec.clone();
        spec.stages = Vec::new();
        if let Some(model) = &stage.model {
            spec.model = model.clone();
            spec.fallback_models = Vec::new();
        }
        if !stage.confidence.is_empty() {
            spec.confidence = stage.confidence.clone();
        }
        if let Some(t) = stage.confidence_threshold {
            spec.confidence_threshold = t;
        }
        if let Some(f) = &stage.answer_field {
            spec.answer_field = f.clone();
        }
        if let Some(t) = stage.max_tokens {
            spec.max_tokens = t;
        }
        spec.template = stage.template.clone().unwrap_or_default();
        spec.schema = stage.schema.clone().unwrap_or_default();
        // A split stage has no schema of its own: it makes no call.
        let schema = if files.schema.is_null() { serde_json::json!({}) } else { files.schema };
        JobKind { spec, template: files.template, schema, stage_files: Vec::new() }
    }

    /// The kinds an ensemble stage `i` calls, one per member, in order:
    /// the stage's kind with the member's model (and no fallbacks). A stage
    /// without an ensemble is its one kind.
    pub fn stage_members(&self, i: usize) -> Vec<JobKind> {
        let stage = self.stage_kind(i);
        let ensemble = &self.spec.stages[i].ensemble;
        if ensemble.is_empty() {
            return vec![stage];
        }
        ensemble
            .iter()
            .map(|model| {
                let mut member = stage.clone();
                member.spec.model = model.clone();
                member.spec.fallback_models = Vec::new();
                member
            })
            .collect()
    }

    /// The kind an ensemble stage `i`'s adjudicator is asked as, if it has one.
    pub fn stage_adjudicator(&self, i: usize) -> Option<JobKind> {
        let model = self.spec.stages[i].adjudicator.as_ref()?;
        let mut judge = self.stage_kind(i);
        judge.spec.model = model.clone();
        judge.spec.fallback_models = Vec::new();
        Some(judge)
    }

    /// Every kind stage `i` may call: its members (or itself) and its adjudicator.
    pub fn stage_callers(&self, i: usize) -> Vec<JobKind> {
        let mut kinds = self.stage_members(i);
        kinds.extend(self.stage_adjudicator(i));
        kinds
    }

    /// Every model a job of this kind may call: the kind's (main and
    /// fallbacks), or each stage's (every member of an ensemble, and its
    /// adjudicator).
    pub fn models(&self) -> Vec<String> {
        if self.spec.stages.is_empty() {
            return self.spec.models().cloned().collect();
        }
        (0..self.spec.stages.len())
            .flat_map(|i| self.stage_callers(i))
            .flat_map(|k| k.spec.models().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Compiles the output schema.
    pub fn validator(&self) -> Result<jsonschema::Validator, SpecError> {
        jsonschema::validator_for(&self.schema).map_err(|e| SpecError::Schema(e.to_string()))
    }

    /// Hex SHA-256 of the prompt template (and system message): recorded with
    /// every result so an answer can be traced to the exact prompt version.
    pub fn template_hash(&self) -> String {
        let mut h = Sha256::new();
        if let Some(system) = &self.spec.system {
            h.update(system.as_bytes());
            h.update([0u8]);
        }
        h.update(self.template.as_bytes());
        // Every stage's prompt, in order: a change to any of them is a new version.
        for f in &self.stage_files {
            h.update([0u8]);
            h.update(f.template.as_bytes());
        }
        hex::encode(h.finalize())[..16].to_string()
    }
}

fn read(path: &Path) -> Result<String, SpecError> {
    std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.to_path_buf(), source })
}

/// A compiled prompt template.
pub struct Prompt {
    env: minijinja::Environment<'static>,
    labels: Vec<String>,
    request: RequestSource,
}

impl Prompt {
    pub fn new(kind: &JobKind) -> Result<Self, SpecError> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned("prompt", kind.template.clone()).map_err(SpecError::Template)?;
        Ok(Prompt { env, labels: kind.spec.labels.clone(), request: kind.spec.request })
    }

    /// The fields of `input_fields` the template never reads (each input
    /// line must carry them all the same).
    pub fn unread_fields(&self, input_fields: &[String]) -> Vec<String> {
        let Ok(template) = self.env.get_template("prompt") else { return Vec::new() };
        let read = template.undeclared_variables(false);
        input_fields.iter().filter(|f| !read.contains(f.as_str())).cloned().collect()
    }

    /// The variables the template reads that are neither in `input_fields`
    /// nor provided by Sluice (`labels`, and minijinja's own globals such as
    /// `range`), sorted. Without this check such a template passes submit and
    /// then fails every item with a `template` error.
    pub fn undeclared_fields(&self, input_fields: &[String]) -> Vec<String> {
        let Ok(template) = self.env.get_template("prompt") else { return Vec::new() };
        let mut unknown: Vec<String> = template
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| v != "labels" && !input_fields.contains(v) && !self.env.globals().any(|(g, _)| g == v))
            .collect();
        unknown.sort();
        unknown
    }

    /// Renders the prompt for one item; the item's fields and `labels` are in
    /// scope. For an OpenAI Batch line it is the line's `body`, as JSON: what
    /// is sent, measured, hashed for the response cache and audited.
    pub fn render(&self, item: &Value) -> Result<String, minijinja::Error> {
        if self.request == RequestSource::OpenaiBatch {
            return match item.get("body") {
                Some(body @ Value::Object(_)) => Ok(body.to_string()),
                _ => {
                    Err(minijinja::Error::new(minijinja::ErrorKind::UndefinedError, "the line has no \"body\" object"))
                }
            };
        }
        let mut ctx = match item {
            Value::Object(map) => map.clone(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("input".into(), other.clone());
                m
            }
        };
        ctx.insert("labels".into(), Value::from(self.labels.clone()));
        self.env.get_template("prompt")?.render(minijinja::value::Serde(&ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_field_and_labels_must_agree_with_the_schema() {
        let schema = |labels: &[&str], required: &[&str]| {
            serde_json::json!({"type": "object", "properties": {"label": {"type": "string", "enum": labels},
                "note": {"type": "string"}}, "required": required})
        };
        let labels = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let lower = ["positive", "negative", "neutral"];
        // answer field, labels, schema: the problems' telling words
        let cases: Vec<(&str, Vec<String>, Value, Vec<&str>)> = vec![
            ("label", labels(&lower), schema(&["neutral", "positive", "negative"], &["label"]), vec![]),
            ("label", vec![], schema(&["Positive"], &["label"]), vec![]),
            ("label", labels(&lower), serde_json::json!({"type": "object"}), vec![]),
            (
                "label",
                labels(&lower),
                schema(&["Positive", "Negative", "Neutral"], &["label"]),
                vec!["differ only in case", "labels = [\"Positive\", \"Negative\", \"Neutral\"]"],
            ),
            ("label", labels(&lower), schema(&["yes", "no"], &["label"]), vec!["make them the same list"]),
            ("label", labels(&lower), schema(&lower, &[]), vec!["not in \"required\" of schema.json"]),
            (
                "answer",
                labels(&lower),
                schema(&lower, &["label"]),
                vec!["not among the properties of schema.json (label, note)"],
            ),
        ];
        for (field, labels, schema, words) in cases {
            let problems = answer_problems(field, &labels, &schema, "schema.json");
            assert_eq!(problems.len(), words.len().min(1), "{field} {labels:?}: {problems:?}");
            for w in words {
                assert!(problems[0].contains(w), "{w}: {problems:?}");
            }
        }
        // Both at once: not required, and labels spelled otherwise.
        let both =
            answer_problems("label", &labels(&lower), &schema(&["Positive", "Negative", "Neutral"], &[]), "s.json");
        assert_eq!(both.len(), 2, "{both:?}");
    }

    fn repo_jobs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs")
    }

    #[test]
    fn shipped_kinds_load_and_render() {
        for name in ["classify", "summarize"] {
            let kind = JobKind::load(&repo_jobs().join(name)).unwrap();
            assert_eq!(kind.spec.kind, name);
            let prompt = Prompt::new(&kind).unwrap();
            let text = prompt.render(&serde_json::json!({"id": "1", "text": "The striker scored."})).unwrap();
            assert!(text.contains("The striker scored."), "{text}");
            assert_eq!(kind.template_hash().len(), 16);
        }
        // The multi-stage kinds: every stage's template renders a sample input.
        for (name, input) in
            [("article", crate::sample::brief(1, 0)), ("contract-review", crate::sample::contract(1, 0))]
        {
            let kind = JobKind::load(&repo_jobs().join(name)).unwrap();
            assert_eq!(kind.spec.kind, name);
            assert_eq!(kind.spec.stages.len(), 3);
            for i in 0..3 {
                if kind.spec.stages[i].kind == crate::stages::StageKind::Split {
                    continue;
                }
                let stage = kind.stage_kind(i);
                let prompt = Prompt::new(&stage).unwrap();
                let mut item = input.clone();
                item["stages"] = serde_json::json!({"outline": {"title": "T", "sections": ["a", "b"]},
                                                     "draft": {"body": "one two", "citations": ["u"]}});
                item["segment"] = serde_json::json!({"text": "1. clause", "number": 1});
                item["segments"] = serde_json::json!([{"number": 1, "clauses": {"label": "risky"}},
                                                       {"number": 2, "clauses": {"label": "standard"}}]);
                let text = prompt.render(&item).unwrap();
                assert!(text.contains("Document:"), "{name} stage {i}: {text}");
                if name == "contract-review" && i == 2 {
                    assert!(text.ends_with("Part 1 of 2 is risky. "), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn the_openai_batch_kind_renders_the_lines_body() {
        let kind = JobKind::load(&repo_jobs().join("openai-batch")).unwrap();
        assert_eq!((kind.spec.request, kind.spec.required_fields()), (RequestSource::OpenaiBatch, vec!["body".into()]));
        let prompt = Prompt::new(&kind).unwrap();
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let line = serde_json::json!({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": body});
        assert_eq!(prompt.render(&line).unwrap(), body.to_string());
        assert!(prompt.render(&serde_json::json!({"custom_id": "1"})).is_err());
        // A stored spec of a template kind is as it was before the field existed.
        let classify = JobKind::load(&repo_jobs().join("classify")).unwrap();
        assert!(serde_json::to_value(&classify.spec).unwrap().get("request").is_none());
    }

    #[test]
    fn enumerated_parameters_outside_what_providers_accept_are_refused_naming_the_field() {
        let kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        let with = |effort: Option<&str>, temperature: f32| {
            let mut k = kind.clone();
            k.spec.reasoning_effort = effort.map(str::to_string);
            k.spec.temperature = temperature;
            k.validate().map_err(|e| e.to_string())
        };
        for (effort, temperature, refused) in [
            (None, 0.0, None),
            (Some("low"), 0.0, None),
            (Some("minimal"), 1.5, None),
            (Some("xhigh"), 2.0, None),
            (Some("extreme"), 0.0, Some("reasoning_effort = \"extreme\"")),
            (Some("Low"), 0.0, Some("reasoning_effort = \"Low\"")),
            (None, 2.5, Some("temperature = 2.5")),
            (None, -0.1, Some("temperature = -0.1")),
        ] {
            match (with(effort, temperature), refused) {
                (Ok(()), None) => {}
                (Err(e), Some(field)) => assert!(e.contains(field) && e.contains("job.toml"), "{e}"),
                (got, want) => panic!("{effort:?} at {temperature}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn missing_template_variable_is_an_error() {
        let kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        let prompt = Prompt::new(&kind).unwrap();
        assert!(prompt.render(&serde_json::json!({"id": "1"})).is_err());
    }

    #[test]
    fn a_template_field_missing_from_input_fields_is_refused() {
        let mut kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        kind.template = "{% for i in range(2) %}{% set n = i %}{{ title }} {{ n }}{% endfor %}\n{{ text }} {{ labels }} {{ author.name }}"
            .into();
        let err = kind.validate().unwrap_err().to_string();
        assert!(err.contains("uses author, title but input_fields declares only [text]"), "{err}");
        kind.spec.input_fields = vec!["text".into(), "title".into(), "author".into()];
        kind.validate().unwrap();
        // The other way: a declared field the template never reads, named
        // together with a field it reads and nobody declared.
        kind.spec.input_fields = vec!["text".into(), "title".into(), "summary".into()];
        let err = kind.validate().unwrap_err().to_string();
        assert!(err.contains("2 problems"), "{err}");
        assert!(
            err.contains("input_fields declares summary but the prompt template (prompt.j2) never reads it"),
            "{err}"
        );
        assert!(err.contains("uses author but input_fields declares only [text, title, summary]"), "{err}");
    }

    #[test]
    fn invalid_threshold_is_rejected() {
        let mut kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        kind.spec.confidence_threshold = 1.5;
        let err = kind.validate().unwrap_err().to_string();
        assert!(err.contains("confidence_threshold"), "{err}");
    }

    #[test]
    fn confidence_is_one_strategy_or_a_list() {
        let kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        let mut spec = toml::to_string(&kind.spec).unwrap();
        spec = spec.replace("confidence = [\"logprobs\"]", "confidence = \"self_reported\"");
        let one: JobSpec = toml::from_str(&spec).unwrap();
        assert_eq!(one.confidence, [ConfidenceStrategy::SelfReported]);
        let spec = spec.replace("confidence = \"self_reported\"", "confidence = [\"logprobs\", \"agreement\"]");
        let many: JobSpec = toml::from_str(&spec).unwrap();
        assert_eq!(many.confidence, [ConfidenceStrategy::Logprobs, ConfidenceStrategy::Agreement]);
        // Specs stored before lists existed still load.
        let stored = serde_json::to_value(&kind.spec).unwrap();
        let mut old = stored.clone();
        old["confidence"] = serde_json::json!("logprobs");
        assert_eq!(serde_json::from_value::<JobSpec>(old).unwrap().confidence, [ConfidenceStrategy::Logprobs]);
    }

    #[test]
    fn a_kind_with_stages_is_checked_and_each_stage_is_a_kind_of_its_own() {
        let mut kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        let stages: JobSpec = toml::from_str(&format!(
            "{}\n[[stages]]\nname = \"a\"\ntemplate = \"a.j2\"\nschema = \"a.json\"\n\
             [[stages]]\nname = \"b\"\ntemplate = \"b.j2\"\nschema = \"b.json\"\n",
            toml::to_string(&kind.spec).unwrap()
        ))
        .unwrap();
        kind.spec.stages = stages.stages;
        let file = |t: &str| crate::stages::StageFiles { template: t.into(), schema: serde_json::json!({}) };
        kind.stage_files = vec![file("{{ text }}"), file("{{ stages.c.x }}")];
        let err = kind.validate().unwrap_err().to_string();
        assert!(err.contains("stages[1].template (b): reads stages.c"), "{err}");
        kind.stage_files[1] = file("{{ stages.a.x }}");
        kind.validate().unwrap();
        // A stage's schema must hold the answer field.
        let label_only =
            serde_json::json!({"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]});
        kind.stage_files[0].schema = label_only.clone();
        let err = kind.validate().unwrap_err().to_string();
        assert!(
            err.contains("answer_field = \"label\" (job.toml) is not among the properties of stages[0] (a)"),
            "{err}"
        );
        kind.spec.stages[0].answer_field = Some("x".into());
        kind.spec.stages[1].model = Some("sim-large".into());
        kind.validate().unwrap();
        let b = kind.stage_kind(1);
        assert_eq!((b.spec.model.as_str(), b.template.as_str()), ("sim-large", "{{ stages.a.x }}"));
        assert!(b.spec.fallback_models.is_empty() && b.spec.stages.is_empty());
        assert_eq!(kind.stage_kind(0).spec.answer_field, "x");
        // An ensemble's members are the stage with each member's model.
        kind.spec.stages[0].model = None;
        kind.spec.stages[0].ensemble = vec!["sim-small".into(), "sim-large".into()];
        kind.validate().unwrap();
        let members: Vec<String> = kind.stage_members(0).into_iter().map(|k| k.spec.model).collect();
        assert_eq!(members, ["sim-small", "sim-large"]);
        assert_eq!(kind.models(), ["sim-small", "sim-large", "sim-large"]);
        kind.spec.stages[0].weights = vec![1.0];
        let err = kind.validate().unwrap_err().to_string();
        assert!(err.contains("stages[0].weights (a): gives 1 weights for an ensemble of 2"), "{err}");
    }

    #[test]
    fn template_hash_changes_with_template() {
        let mut kind = JobKind::load(&repo_jobs().join("classify")).unwrap();
        let before = kind.template_hash();
        kind.template.push_str("\nBe brief.");
        assert_ne!(before, kind.template_hash());
    }
}

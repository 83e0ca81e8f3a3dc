//! The stages of a multi-stage job kind (`[[stages]]` in `job.toml`) and the checks that refuse a bad one with the field named.
//!
//! ```toml
//! [[stages]]
//! name = "outline"
//! template = "outline.j2"          # sees the item's fields and earlier stages' outputs
//! schema = "outline.schema.json"
//! gate = "approve_all"             # every item waits for a reviewer's approval
//!
//! [[stages]]
//! name = "draft"
//! template = "draft.j2"            # {{ stages.outline.sections }}
//! schema = "draft.schema.json"
//! model = "anthropic/claude-sonnet-4-5"
//! ```
//!
//! Stages run in the order listed; a stage's template may read only the
//! outputs of stages before it. A `split` stage cuts an input field into
//! segments that fit the model's context (`crate::segment`); the stages
//! after it run once per segment (their template sees `segment`) until a
//! `reduce` stage, which runs once per item over the list of its segments'
//! answers (`segments`). A stage with an `ensemble` asks each of its models
//! and takes their weighted vote.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{ConfidenceStrategy, SpecError};

/// One `[[stages]]` entry. Fields left out take the kind's own (`model`,
/// `max_tokens`, `confidence`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// How later stages' templates name its output: `stages.NAME`.
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: StageKind,
    /// Prompt template file, relative to the kind's folder (prompt and
    /// reduce stages).
    #[serde(default)]
    pub template: Option<String>,
    /// JSON schema of the stage's output (prompt and reduce stages).
    #[serde(default)]
    pub schema: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// Several models that each answer; the stage's answer is their vote.
    #[serde(default)]
    pub ensemble: Vec<String>,
    /// The ensemble members' weights in the vote, in order (1 each if left
    /// out).
    #[serde(default)]
    pub weights: Vec<f64>,
    /// A model asked when the ensemble's members disagree (or one has no
    /// answer), with their answers (`ensemble` in the template): its answer
    /// is the stage's. Without one, disagreements go straight to review.
    #[serde(default)]
    pub adjudicator: Option<String>,
    #[serde(default, deserialize_with = "crate::spec::one_or_many")]
    pub confidence: Vec<ConfidenceStrategy>,
    /// Answers below it go to review (the kind's own if left out).
    #[serde(default)]
    pub confidence_threshold: Option<f64>,
    #[serde(default)]
    pub gate: Option<Gate>,
    #[serde(default)]
    pub answer_field: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Split stages: the most tokens a segment holds.
    #[serde(default)]
    pub segment_tokens: Option<u32>,
    /// Split stages: tokens a segment repeats from the one before it.
    #[serde(default)]
    pub overlap_tokens: Option<u32>,
    /// Split stages: the input field holding the text to cut (`text` if
    /// left out).
    #[serde(default)]
    pub field: Option<String>,
}

impl StageSpec {
    /// The input field a split stage cuts.
    pub fn split_field(&self) -> &str {
        self.field.as_deref().unwrap_or("text")
    }
}

/// What a stage does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// A model call per item (per segment after a split).
    #[default]
    Prompt,
    /// No call: the item's text cut into segments that fit the model's
    /// context; the stages after it run once per segment.
    Split,
    /// A model call per item over the outputs of its segments (`segments`
    /// in the template).
    Reduce,
}

/// What holds an item after a stage until a reviewer decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Answers below the stage's confidence threshold wait for review.
    Review,
    /// Every answer waits for a reviewer's approval.
    ApproveAll,
}

/// A stage's template and schema, read from the kind's folder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageFiles {
    pub template: String,
    pub schema: Value,
}

/// What a stage's template may read besides the item's fields.
const PROVIDED: &[&str] = &["labels", "stages", "segment", "segments", "ensemble"];

/// Checks the stages of a kind whose input lines carry `input_fields` and
/// whose own confidence strategies and threshold are `confidence` and
/// `threshold`: every mistake is refused naming `stages[i].field`.
pub fn validate(
    stages: &[StageSpec],
    files: &[StageFiles],
    input_fields: &[String],
    confidence: &[ConfidenceStrategy],
) -> Result<(), SpecError> {
    let invalid = |i: usize, field: &str, message: String| {
        SpecError::Invalid(format!("stages[{i}].{field} ({}): {message}", stages[i].name))
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut split_before = false;
    // The split whose segments the stages now listed run on, and those stages.
    let mut open_split: Option<usize> = None;
    let mut per_segment: Vec<&str> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let name = stage.name.as_str();
        let identifier = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !identifier {
            return Err(invalid(i, "name", "must be a name a template can use: letters, digits and _".into()));
        }
        if seen.contains(&name) {
            return Err(invalid(i, "name", "another stage has this name".into()));
        }
        let calls = stage.kind != StageKind::Split;
        if calls && (stage.template.is_none() || stage.schema.is_none()) {
            return Err(invalid(i, "template", "a prompt or reduce stage needs a template and a schema".into()));
        }
        if !calls && (stage.template.is_some() || !stage.ensemble.is_empty()) {
            return Err(invalid(i, "type", "a split stage makes no call: it takes no template or ensemble".into()));
        }
        if stage.kind == StageKind::Split && stage.segment_tokens.is_none_or(|t| t == 0) {
            return Err(invalid(i, "segment_tokens", "a split stage needs the most tokens of a segment".into()));
        }
        if let (Some(s), Some(o)) = (stage.segment_tokens, stage.overlap_tokens) {
            if o >= s {
                return Err(invalid(i, "overlap_tokens", format!("must be below segment_tokens ({s})")));
            }
        }
        if stage.kind == StageKind::Reduce && !split_before {
            return Err(invalid(
                i,
                "type",
                "a reduce stage combines segments: it needs a split stage before it".into(),
            ));
        }
        match stage.kind {
            StageKind::Split if open_split.is_some() => {
                return Err(invalid(i, "type", "a split inside a split: reduce the segments first".into()))
            }
            StageKind::Split if !input_fields.iter().any(|f| f == stage.split_field()) => {
                return Err(invalid(
                    i,
                    "field",
                    format!(
                        "cuts the input field {:?}, which input_fields does not declare ([{}])",
                        stage.split_field(),
                        input_fields.join(", ")
                    ),
                ))
            }
            StageKind::Split => open_split = Some(i),
            StageKind::Reduce if open_split.is_some_and(|j| j + 1 == i) => {
                return Err(invalid(
                    i,
                    "type",
                    "nothing runs per segment between the split and this reduce: put a stage between them".into(),
                ))
            }
            StageKind::Reduce => open_split = None,
            StageKind::Prompt if open_split.is_some() && stage.gate.is_some() => {
                return Err(invalid(
                    i,
                    "gate",
                    "this stage runs once per segment, and segments cannot be held at a gate: gate the reduce \
                     stage instead"
                        .into(),
                ))
            }
            StageKind::Prompt => {}
        }
        if stage.ensemble.len() == 1 {
            return Err(invalid(
                i,
                "ensemble",
                "an ensemble of one model is no ensemble: name two or more, or set model instead".into(),
            ));
        }
        if !stage.ensemble.is_empty() && stage.model.is_some() {
            return Err(invalid(i, "model", "give model or ensemble, not both".into()));
        }
        if !stage.weights.is_empty() && stage.weights.len() != stage.ensemble.len() {
            return Err(invalid(
                i,
                "weights",
                format!("gives {} weights for an ensemble of {}", stage.weights.len(), stage.ensemble.len()),
            ));
        }
        if stage.adjudicator.is_some() && stage.ensemble.is_empty() {
            return Err(invalid(
                i,
                "adjudicator",
                "an adjudicator settles an ensemble's disagreements: name the ensemble's models too".into(),
            ));
        }
        if stage.weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
            return Err(invalid(i, "weights", "each weight must be a positive number".into()));
        }
        if let Some(t) = stage.confidence_threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(invalid(i, "confidence_threshold", format!("must be within 0..=1, got {t}")));
            }
        }
        let strategies = if stage.confidence.is_empty() { confidence } else { &stage.confidence[..] };
        let scores = strategies.iter().any(|c| *c != ConfidenceStrategy::None);
        match stage.gate {
            Some(Gate::Review) if !calls => {
                return Err(invalid(i, "gate", "a split stage has no answers to review".into()))
            }
            Some(Gate::Review) if !scores && stage.ensemble.is_empty() => {
                return Err(invalid(
                    i,
                    "gate",
                    "gate = \"review\" holds answers below the review threshold, but the stage computes no \
                     confidence: set its confidence (or use gate = \"approve_all\")"
                        .into(),
                ))
            }
            Some(Gate::Review | Gate::ApproveAll) if i + 1 == stages.len() => {
                return Err(invalid(
                    i,
                    "gate",
                    "the last stage has no stage after it to hold items back from: its answers below the \
                     threshold go to review as a single-stage kind's do (leave gate out)"
                        .into(),
                ))
            }
            _ => {}
        }
        if calls {
            let file = files.get(i).cloned().unwrap_or_default();
            let mut env = minijinja::Environment::new();
            env.add_template_owned("t", file.template).map_err(SpecError::Template)?;
            let template = env.get_template("t").map_err(SpecError::Template)?;
            let mut read: Vec<String> = template.undeclared_variables(true).into_iter().collect();
            read.sort();
            for var in &read {
                if let Some(rest) = var.strip_prefix("stages.") {
                    let other = rest.split('.').next().unwrap_or_default();
                    if per_segment.contains(&other) && open_split.is_none() {
                        return Err(invalid(
                            i,
                            "template",
                            format!(
                                "reads stages.{other}, which runs once per segment: a reduce stage reads its \
                                 answers as `segments` (each segment's `{other}`)"
                            ),
                        ));
                    }
                    if !seen.contains(&other) {
                        let why = if stages.iter().any(|s| s.name == other) {
                            format!(
                                "reads stages.{other}, which does not run before it: a stage reads only the \
                                 stages listed above it (reading itself or a later one would be a cycle)"
                            )
                        } else {
                            let earlier = if seen.is_empty() { "none".to_string() } else { seen.join(", ") };
                            format!("reads stages.{other}, but no stage is named {other} (stages before it: {earlier})")
                        };
                        return Err(invalid(i, "template", why));
                    }
                }
            }
            let mut unknown: Vec<String> = template
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !PROVIDED.contains(&v.as_str()) && !input_fields.contains(v))
                .filter(|v| !env.globals().any(|(g, _)| g == v))
                .collect();
            unknown.sort_unstable();
            if !unknown.is_empty() {
                return Err(invalid(
                    i,
                    "template",
                    format!("uses {} but input_fields declares only [{}]", unknown.join(", "), input_fields.join(", ")),
                ));
            }
            jsonschema::validator_for(&file.schema)
                .map_err(|e| invalid(i, "schema", format!("not a valid JSON schema: {e}")))?;
        }
        split_before |= stage.kind == StageKind::Split;
        if open_split.is_some() && stage.kind == StageKind::Prompt {
            per_segment.push(name);
        }
        seen.push(name);
    }
    if let Some(j) = open_split {
        return Err(invalid(
            j,
            "type",
            "a split stage needs a reduce stage after it to combine each item's segments into one answer".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSpec;

    const KIND: &str = r#"
kind = "article"
model = "sim-small"
max_tokens = 100
answer_field = "title"
input_fields = ["brief"]
confidence = "self_reported"
"#;

    /// Checks stages given as TOML, with the templates of the stages in order.
    fn check(stages: &str, templates: &[&str]) -> Result<(), SpecError> {
        let spec: JobSpec = toml::from_str(&format!("{KIND}{stages}")).unwrap();
        let schema = serde_json::json!({"type": "object"});
        let files: Vec<StageFiles> =
            templates.iter().map(|t| StageFiles { template: t.to_string(), schema: schema.clone() }).collect();
        validate(&spec.stages, &files, &spec.input_fields, &spec.confidence)
    }

    fn refused(stages: &str, templates: &[&str]) -> String {
        check(stages, templates).unwrap_err().to_string()
    }

    const TWO: &str = r#"
[[stages]]
name = "outline"
template = "outline.j2"
schema = "outline.json"
gate = "approve_all"
[[stages]]
name = "draft"
template = "draft.j2"
schema = "draft.json"
"#;

    #[test]
    fn stages_reading_earlier_stages_pass() {
        check(TWO, &["Outline {{ brief }}", "Write {{ stages.outline.sections }} for {{ brief }}"]).unwrap();
        let split = r#"
[[stages]]
name = "clauses"
type = "split"
field = "brief"
segment_tokens = 2000
overlap_tokens = 100
[[stages]]
name = "classify"
template = "c.j2"
schema = "c.json"
ensemble = ["openai/a", "anthropic/b", "local/c"]
[[stages]]
name = "verdict"
type = "reduce"
template = "v.j2"
schema = "v.json"
"#;
        check(split, &["", "{{ segment }}", "{% for s in segments %}{{ s.label }}{% endfor %}"]).unwrap();
    }

    #[test]
    fn splits_need_a_field_a_reduce_and_stages_between() {
        let stage = |name: &str, extra: &str| {
            let calls = if extra.contains("split") { "" } else { "template = \"t.j2\"\nschema = \"s.json\"\n" };
            format!("[[stages]]\nname = \"{name}\"\n{calls}{extra}\n")
        };
        let split = |field: &str| stage("cut", &format!("type = \"split\"\nsegment_tokens = 100\nfield = \"{field}\""));
        let err = refused(&(split("body") + &stage("c", "") + &stage("r", "type = \"reduce\"")), &["", "", ""]);
        assert!(err.contains("stages[0].field (cut): cuts the input field \"body\""), "{err}");
        let err = refused(&(split("brief") + &stage("c", "")), &["", ""]);
        assert!(err.contains("stages[0].type (cut): a split stage needs a reduce stage after it"), "{err}");
        let err = refused(&(split("brief") + &stage("r", "type = \"reduce\"")), &["", ""]);
        assert!(err.contains("stages[1].type (r): nothing runs per segment"), "{err}");
        let gated = stage("c", "gate = \"approve_all\"");
        let err = refused(&(split("brief") + &gated + &stage("r", "type = \"reduce\"")), &["", "", ""]);
        assert!(err.contains("stages[1].gate (c): this stage runs once per segment"), "{err}");
        // After the reduce, a segment stage's answers are read through `segments`.
        let four = split("brief") + &stage("c", "") + &stage("r", "type = \"reduce\"") + &stage("after", "");
        let err = refused(&four, &["", "{{ segment.text }}", "{{ segments }}", "{{ stages.c.label }}"]);
        assert!(err.contains("stages[3].template (after): reads stages.c, which runs once per segment"), "{err}");
        check(&four, &["", "{{ segment.text }}", "{{ segments }}", "{{ stages.r.verdict }}"]).unwrap();
    }

    #[test]
    fn a_stage_reading_an_unknown_stage_is_refused_naming_it() {
        let err = refused(TWO, &["{{ brief }}", "{{ stages.outlin.sections }}"]);
        assert_eq!(
            err,
            "job spec: stages[1].template (draft): reads stages.outlin, but no stage is named outlin \
             (stages before it: outline)"
        );
    }

    #[test]
    fn a_stage_reading_itself_or_a_later_one_is_a_cycle() {
        let err = refused(TWO, &["{{ stages.draft.text }}", "{{ stages.outline.sections }}"]);
        assert!(
            err.starts_with("job spec: stages[0].template (outline): reads stages.draft, which does not run before it"),
            "{err}"
        );
        assert!(err.contains("cycle"), "{err}");
        let err = refused(TWO, &["{{ brief }}", "{{ stages.draft.text }}"]);
        assert!(err.starts_with("job spec: stages[1].template (draft): reads stages.draft"), "{err}");
    }

    #[test]
    fn an_adjudicator_needs_an_ensemble() {
        let judged = TWO.replace("schema = \"draft.json\"", "schema = \"draft.json\"\nadjudicator = \"openai/a\"");
        let err = refused(&judged, &["{{ brief }}", "{{ stages.outline.sections }}"]);
        assert!(err.starts_with("job spec: stages[1].adjudicator (draft): an adjudicator settles"), "{err}");
    }

    #[test]
    fn an_ensemble_of_one_is_refused() {
        let one = TWO.replace("schema = \"draft.json\"", "schema = \"draft.json\"\nensemble = [\"openai/a\"]");
        let err = refused(&one, &["{{ brief }}", "{{ brief }}"]);
        assert!(err.starts_with("job spec: stages[1].ensemble (draft): an ensemble of one model"), "{err}");
    }

    #[test]
    fn a_gate_on_the_last_stage_or_without_confidence_is_refused() {
        let last = TWO.replace("schema = \"draft.json\"", "schema = \"draft.json\"\ngate = \"review\"");
        let err = refused(&last, &["{{ brief }}", "{{ brief }}"]);
        assert!(err.starts_with("job spec: stages[1].gate (draft): the last stage"), "{err}");
        let blind = TWO.replace("gate = \"approve_all\"", "gate = \"review\"\nconfidence = \"none\"");
        let err = refused(&blind, &["{{ brief }}", "{{ brief }}"]);
        assert!(err.starts_with("job spec: stages[0].gate (outline): gate = \"review\""), "{err}");
    }

    #[test]
    fn malformed_stages_are_refused_with_the_field_named() {
        let t = &["{{ brief }}", "{{ brief }}"];
        let cases = [
            (TWO.replace("name = \"draft\"", "name = \"outline\""), "stages[1].name (outline): another stage"),
            (TWO.replace("name = \"draft\"", "name = \"the draft\""), "stages[1].name (the draft): must be a name"),
            (TWO.replace("template = \"draft.j2\"\n", ""), "stages[1].template (draft): a prompt or reduce stage"),
            (
                TWO.replace("name = \"draft\"", "name = \"draft\"\ntype = \"reduce\""),
                "stages[1].type (draft): a reduce stage",
            ),
            (
                TWO.replace("name = \"draft\"", "name = \"draft\"\nconfidence_threshold = 2.0"),
                "stages[1].confidence_threshold",
            ),
        ];
        for (stages, want) in cases {
            let err = refused(&stages, t);
            assert!(err.contains(want), "{want}: {err}");
        }
        let split = "[[stages]]\nname = \"cut\"\ntype = \"split\"\n[[stages]]\nname = \"x\"\ntemplate = \"x\"\nschema = \"x\"\n";
        assert!(refused(split, &["", "{{ segment }}"]).contains("stages[0].segment_tokens (cut)"));
        let err = refused(TWO, &["{{ brief }} {{ author }}", "{{ brief }}"]);
        assert!(
            err.contains("stages[0].template (outline): uses author but input_fields declares only [brief]"),
            "{err}"
        );
    }
}

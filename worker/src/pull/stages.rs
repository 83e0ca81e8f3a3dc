//! Multi-stage items: each goes through its job's stages in order inside its chunk, as soon as the stage before is done.
//!
//! An item never waits for the rest of its job: its stage 2 call starts the
//! moment its stage 1 answer is accepted, while other items are still at
//! stage 1, so there is no barrier between stages. Each stage is a
//! [`CompiledJob`] of its own (template, schema, model, confidence), called
//! through [`run_item`] like any item: under its model's shared rate limit,
//! breaker and retries, each attempt audited with its stage.
//!
//! The accepted answer of a stage before the last goes to the chunk's writer
//! (`goes_on`, written to `stage_results` with the chunk's next batch of
//! results); the last stage's answer, or the failure that stopped the item,
//! is the item's result. A redelivered or resumed item starts at the first
//! stage without a row in `stage_results`: an item that failed at stage 2
//! reruns stage 2, not stage 1.
//!
//! A split stage makes no call: it cuts the item's text into segments
//! (`common::segment`), and the stages up to the next reduce run on each
//! segment in turn, their answers kept per segment (`stage_results.seg`) so
//! a resumed item redoes only the segments it had not finished. The reduce
//! stage then runs once, over the list of the segments' answers.
//!
//! A gated stage (`gate = "review"` below its threshold, `"approve_all"`
//! always) writes its answer as `held` and the item stops there: its chunk
//! finishes without it, and the job is not complete while it waits. A
//! reviewer's decision (`sluice review import`) marks the row approved (its
//! output perhaps edited) and publishes the chunk again, whose delivery takes
//! the item on from the next stage; a rejection ends the item with a failed
//! result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::segment;
use common::stages::{Gate, StageKind};
use common::wire::ChunkMsg;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{item_context, Shared};
use crate::confidence::{self, Vote};
use crate::delivery::Delivery;
use crate::jobs::CompiledJob;
use crate::process::{run_item, Outcome};
use crate::store::{self, Item, ItemResult};
use crate::Error;

/// Where an item of a multi-stage chunk stands.
#[derive(Default)]
pub(super) struct Passed {
    /// The outputs of the stages it has passed, and their confidence, by
    /// stage and segment (0 for stages that run once per item).
    pub outputs: HashMap<(usize, i32), (Value, Option<f64>)>,
    /// It waits at a gate for a reviewer's decision: nothing to do now.
    pub waiting: bool,
}

/// Where each item of a chunk stands, by seq.
pub(super) async fn passed(shared: &Shared, chunk: &ChunkMsg) -> Result<HashMap<i64, Passed>, Error> {
    let mut by_item: HashMap<i64, Passed> = HashMap::new();
    for row in store::stage_outputs(&shared.pool, chunk).await? {
        let item = by_item.entry(row.seq).or_default();
        if row.waiting {
            item.waiting = true;
        } else {
            item.outputs.insert((row.stage as usize, row.seg), (row.output, row.confidence));
        }
    }
    Ok(by_item)
}

/// How one stage call of an item ended.
enum Call {
    /// Accepted: the result, `stage` and `seg` set.
    Answered(Box<ItemResult>),
    /// The item is done: failed here (its result), or held back.
    Ends(Outcome),
}

/// One item on its way through the stages.
struct Run<'a> {
    shared: &'a Arc<Shared>,
    chunk: &'a ChunkMsg,
    job: &'a CompiledJob,
    delivery: &'a Delivery,
    item: &'a Item,
    /// Attempts so far, across stages and deliveries: numbering goes on.
    prior: i32,
}

impl Run<'_> {
    /// Calls stage `k` (segment `seg`) with the item's fields and `extra`
    /// (`stages`, `segment`, `segments`) as its template's variables.
    async fn call(&mut self, k: usize, seg: i32, extra: serde_json::Map<String, Value>) -> Result<Call, Error> {
        let stage = &self.job.stages[k];
        let mut payload = self.item.payload.clone();
        if let Value::Object(fields) = &mut payload {
            fields.extend(extra);
        }
        if !stage.members.is_empty() {
            return self.ensemble(k, seg, payload).await;
        }
        let mut r = match self.ask(k, &stage.job, payload).await? {
            Outcome::Done(r) => r,
            held @ Outcome::Held(_) => return Ok(Call::Ends(held)),
        };
        r.stage = Some(k as i16);
        r.seg = seg;
        Ok(Call::Answered(r))
    }

    /// One model's answer at stage `k` (through `job`, the stage or one of
    /// its ensemble's members), under a call permit.
    async fn ask(&mut self, k: usize, job: &CompiledJob, payload: Value) -> Result<Outcome, Error> {
        let at = Item { seq: self.item.seq, id: self.item.id.clone(), payload, prior: self.prior };
        let _call = tokio::select! {
            permit = self.shared.calls.acquire(&self.job.project, self.chunk.job_id) => permit,
            _ = self.delivery.stop().cancelled() => return Ok(Outcome::Held(Duration::ZERO)),
        };
        let mut ctx = item_context(self.shared, self.chunk, job, self.delivery);
        ctx.stage = k as i16;
        let outcome = run_item(&ctx, job, &at, None).await?;
        if let Outcome::Done(r) = &outcome {
            self.prior = r.attempts;
        }
        Ok(outcome)
    }

    /// Asks each member of ensemble stage `k` in turn and takes their vote
    /// ([`confidence::ensemble`]). A member whose breaker is open or whose
    /// calls failed is left out, and the confidence shows it; the stage is
    /// held back only when no member answered and one may yet (breaker), and
    /// fails when every member failed.
    async fn ensemble(&mut self, k: usize, seg: i32, payload: Value) -> Result<Call, Error> {
        let stage = &self.job.stages[k];
        let mut votes = Vec::with_capacity(stage.members.len());
        let mut answers: Vec<Option<Box<ItemResult>>> = Vec::with_capacity(stage.members.len());
        let mut held: Option<Duration> = None;
        for (member, weight) in &stage.members {
            let model = member.kind.spec.model.clone();
            match self.ask(k, member, payload.clone()).await? {
                Outcome::Held(wait) if wait.is_zero() => return Ok(Call::Ends(Outcome::Held(wait))),
                Outcome::Held(wait) => {
                    held = Some(held.map_or(wait, |h| h.min(wait)));
                    votes.push(Vote { model, weight: *weight, answer: Err("its circuit breaker is open".into()) });
                    answers.push(None);
                }
                Outcome::Done(r) => {
                    let answer = match (&r.answer, r.succeeded) {
                        (Some(a), true) => Ok((a.clone(), r.confidence)),
                        _ => Err(r.error.clone().unwrap_or_else(|| "no answer".into())),
                    };
                    votes.push(Vote { model, weight: *weight, answer });
                    answers.push(Some(r));
                }
            }
        }
        let mut verdict = confidence::ensemble(&votes);
        // A split vote (or a member missing) goes to the adjudicator, if the
        // stage has one, with the members' answers.
        let split = verdict.scored.detail["agreement"].as_f64().is_none_or(|a| a < 1.0);
        let mut judged: Option<Box<ItemResult>> = None;
        if let (Some(judge), true) = (&stage.adjudicator, split) {
            let mut payload = payload.clone();
            payload["ensemble"] = votes
                .iter()
                .map(|v| json!({"model": v.model, "answer": v.answer.as_ref().ok().map(|(a, _)| a)}))
                .collect();
            let model = judge.kind.spec.model.clone();
            let vote = match self.ask(k, judge, payload).await? {
                Outcome::Held(wait) if wait.is_zero() => return Ok(Call::Ends(Outcome::Held(wait))),
                Outcome::Held(_) => Vote { model, weight: 1.0, answer: Err("its circuit breaker is open".into()) },
                Outcome::Done(r) => {
                    let answer = match (&r.answer, r.succeeded) {
                        (Some(a), true) => Ok((a.clone(), r.confidence)),
                        _ => Err(r.error.clone().unwrap_or_else(|| "no answer".into())),
                    };
                    if answer.is_ok() {
                        judged = Some(r);
                    }
                    Vote { model, weight: 1.0, answer }
                }
            };
            verdict = confidence::adjudicate(&votes, &vote);
        }
        // Tokens and time of every call the stage made, the judge's included.
        let sum = |f: fn(&ItemResult) -> i32| answers.iter().flatten().chain(judged.iter()).map(|r| f(r)).sum::<i32>();
        let (tokens_in, tokens_out, latency_ms) = (sum(|r| r.tokens_in), sum(|r| r.tokens_out), sum(|r| r.latency_ms));
        let mut r = match verdict.answer {
            Some((_, winners)) => {
                let mut r = match judged.take() {
                    Some(judge) => judge,
                    None => answers[winners[0]].take().expect("a winner answered"),
                };
                r.confidence = verdict.scored.value;
                r.needs_review = verdict.scored.value.is_none_or(|v| v < stage.job.review_below);
                r.confidence_detail = Some(verdict.scored.detail);
                r
            }
            // No answer yet, but a member held back by its breaker may give one.
            None if held.is_some() => return Ok(Call::Ends(Outcome::Held(held.unwrap_or_default()))),
            None => {
                let mut r = Box::new(ItemResult::pending(self.item));
                let why: Vec<String> =
                    votes.iter().filter_map(|v| v.answer.as_ref().err().map(|e| format!("{}: {e}", v.model))).collect();
                r.error_class = answers.iter().flatten().find_map(|a| a.error_class);
                r.error = Some(format!("no member of the ensemble answered ({})", why.join("; ")));
                r.confidence_detail = Some(verdict.scored.detail);
                r
            }
        };
        (r.tokens_in, r.tokens_out, r.latency_ms) = (tokens_in, tokens_out, latency_ms);
        r.attempts = self.prior;
        r.stage = Some(k as i16);
        r.seg = seg;
        Ok(Call::Answered(r))
    }
}

/// Runs `item` from the first stage it has not passed (`passed` holds the
/// outputs of those it has) to its last, or until a stage fails, is held
/// back or holds it at a gate. Each accepted answer before the last (and a
/// split's count of segments) is sent to `sink`.
pub(super) async fn run(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &CompiledJob,
    delivery: &Delivery,
    item: Item,
    passed: Passed,
    sink: &mpsc::UnboundedSender<ItemResult>,
) -> Result<Outcome, Error> {
    let mut run = Run { shared, chunk, job, delivery, item: &item, prior: item.prior };
    // Outputs of the stages run once per item, by name (`stages.NAME`).
    let mut outputs = serde_json::Map::new();
    // After a split: each segment's answers, for the reduce (`segments`),
    // and the least confidence among them.
    let mut segments: Option<Vec<Value>> = None;
    let mut weakest: Option<Weakest> = None;
    let last = job.stages.len() - 1;
    let mut k = 0;
    while k <= last {
        let stage = &job.stages[k];
        if stage.spec.kind == StageKind::Split {
            let (reduce, answers, least) = match split(&mut run, k, &passed, &outputs, sink).await? {
                Ok(done) => done,
                Err(ends) => return Ok(ends),
            };
            outputs.insert(stage.name.clone(), json!({"segments": answers.len()}));
            segments = Some(answers);
            weakest = least;
            k = reduce;
            continue;
        }
        if let Some((output, _)) = passed.outputs.get(&(k, 0)) {
            outputs.insert(stage.name.clone(), output.clone());
            k += 1;
            continue;
        }
        let mut extra = serde_json::Map::from_iter([("stages".to_string(), Value::Object(outputs.clone()))]);
        if stage.spec.kind == StageKind::Reduce {
            extra.insert("segments".into(), Value::Array(segments.take().unwrap_or_default()));
        }
        let mut r = match run.call(k, 0, extra).await? {
            Call::Answered(r) => r,
            Call::Ends(outcome) => return Ok(outcome),
        };
        if !r.succeeded {
            r.error = r.error.map(|e| format!("stage {} ({}): {e}", k + 1, stage.name));
            return Ok(Outcome::Done(r));
        }
        if stage.spec.kind == StageKind::Reduce {
            if let Some(w) = weakest.take() {
                w.bound(&mut r, stage.job.review_below);
            }
        }
        if k == last {
            return Ok(Outcome::Done(r));
        }
        r.goes_on = true;
        r.held = match stage.gate {
            Some(Gate::ApproveAll) => true,
            Some(Gate::Review) => r.needs_review,
            None => false,
        };
        if r.held {
            // Written with the chunk's results; the item waits for a reviewer.
            return Ok(Outcome::Done(r));
        }
        outputs.insert(stage.name.clone(), r.output.clone().unwrap_or(Value::Null));
        // The receiver lives as long as the chunk's work; if it is gone the
        // chunk is over and the answer is lost with it, as an unwritten one is.
        let _ = sink.send(*r);
        k += 1;
    }
    // Only reached if the last stage was passed, which never happens: its
    // answer is the item's result, not a stage row.
    let why = format!("the item has passed all {} stages but has no result", job.stages.len());
    Ok(Outcome::Done(Box::new(ItemResult::failed(&item, common::provider::ErrorClass::Template, why))))
}

/// The least confident segment answer of an item, at the last stage before
/// its reduce.
struct Weakest {
    confidence: f64,
    /// From 1.
    segment: usize,
}

impl Weakest {
    /// A reduce's answer is no surer than the least sure of the segment
    /// answers it combines: its confidence is bounded by theirs (and it goes
    /// to review below the stage's threshold), the detail naming the segment.
    fn bound(self, r: &mut ItemResult, review_below: f64) {
        if r.confidence.is_none_or(|c| c > self.confidence) {
            r.confidence = Some(self.confidence);
            r.needs_review = self.confidence < review_below;
        }
        if let Some(Value::Object(detail)) = &mut r.confidence_detail {
            detail.insert("weakest_segment".into(), json!({"number": self.segment, "confidence": self.confidence}));
        }
    }
}

/// Cuts the item's text at split stage `k` and runs the stages up to the
/// next reduce on each segment in turn (a segment's attempts number on from
/// the one before). Returns the reduce's index, each segment's answers
/// (`{"index", "number", "text", NAME: output, ...}`) and the least
/// confident of them, or how the item ends: a stage failing on a segment
/// fails the item, naming the segment.
async fn split(
    run: &mut Run<'_>,
    k: usize,
    passed: &Passed,
    outputs: &serde_json::Map<String, Value>,
    sink: &mpsc::UnboundedSender<ItemResult>,
) -> Result<Result<(usize, Vec<Value>, Option<Weakest>), Outcome>, Error> {
    let job = run.job;
    let spec = &job.stages[k].spec;
    let text = run.item.payload.get(spec.split_field()).and_then(Value::as_str).unwrap_or_default();
    let texts = segment::split(text, spec.segment_tokens.unwrap_or(u32::MAX), spec.overlap_tokens.unwrap_or(0));
    let count = texts.len();
    let reduce = (k + 1..job.stages.len()).find(|&j| job.stages[j].spec.kind == StageKind::Reduce).expect("validated");
    if !passed.outputs.contains_key(&(k, 0)) {
        // Recorded for status and audit; the segments themselves are cut
        // again from the same text whenever the item runs.
        let mut r = ItemResult::pending(run.item);
        r.succeeded = true;
        r.output = Some(json!({"segments": count}));
        r.answer = Some(count.to_string());
        r.stage = Some(k as i16);
        r.goes_on = true;
        r.attempts = run.prior;
        let _ = sink.send(r);
    }
    let mut answers = Vec::with_capacity(count);
    let mut weakest: Option<Weakest> = None;
    for (s, text) in texts.into_iter().enumerate() {
        let seg = s as i32;
        let segment = json!({"index": s, "number": s + 1, "count": count, "text": text});
        let mut answer = serde_json::Map::from_iter([
            ("index".to_string(), json!(s)),
            ("number".to_string(), json!(s + 1)),
            ("text".to_string(), json!(text)),
        ]);
        let mut confidence = None;
        for j in k + 1..reduce {
            let stage = &job.stages[j];
            if let Some((output, c)) = passed.outputs.get(&(j, seg)) {
                answer.insert(stage.name.clone(), output.clone());
                confidence = *c;
                continue;
            }
            // Earlier stages of this segment read like the item's own stages.
            let mut stages = outputs.clone();
            stages.extend(
                answer
                    .iter()
                    .filter(|(n, _)| job.stages.iter().any(|st| &st.name == *n))
                    .map(|(n, v)| (n.clone(), v.clone())),
            );
            let extra = serde_json::Map::from_iter([
                ("stages".to_string(), Value::Object(stages)),
                ("segment".to_string(), segment.clone()),
            ]);
            let mut r = match run.call(j, seg, extra).await? {
                Call::Answered(r) => r,
                Call::Ends(outcome) => return Ok(Err(outcome)),
            };
            if !r.succeeded {
                r.error =
                    r.error.map(|e| format!("stage {} ({}), segment {} of {count}: {e}", j + 1, stage.name, s + 1));
                return Ok(Err(Outcome::Done(r)));
            }
            answer.insert(stage.name.clone(), r.output.clone().unwrap_or(Value::Null));
            confidence = r.confidence;
            r.goes_on = true;
            let _ = sink.send(*r);
        }
        if let Some(c) = confidence {
            if weakest.as_ref().is_none_or(|w| c < w.confidence) {
                weakest = Some(Weakest { confidence: c, segment: s + 1 });
            }
        }
        answers.push(Value::Object(answer));
    }
    Ok(Ok((reduce, answers, weakest)))
}

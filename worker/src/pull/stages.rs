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

use common::stages::Gate;
use common::wire::ChunkMsg;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{item_context, Shared};
use crate::delivery::Delivery;
use crate::jobs::CompiledJob;
use crate::process::{run_item, Outcome};
use crate::store::{self, Item, ItemResult};
use crate::Error;

/// Where an item of a multi-stage chunk stands.
#[derive(Default)]
pub(super) struct Passed {
    /// The outputs of the stages it has passed, in stage order.
    pub outputs: Vec<Value>,
    /// It waits at a gate for a reviewer's decision: nothing to do now.
    pub waiting: bool,
}

/// Where each item of a chunk stands, by seq.
pub(super) async fn passed(shared: &Shared, chunk: &ChunkMsg) -> Result<HashMap<i64, Passed>, Error> {
    let mut by_item: HashMap<i64, Passed> = HashMap::new();
    for row in store::stage_outputs(&shared.pool, chunk).await? {
        let item = by_item.entry(row.seq).or_default();
        // Stages are passed in order; a gap would mean the rest must run again.
        if item.outputs.len() == row.stage as usize && !item.waiting {
            if row.waiting {
                item.waiting = true;
            } else {
                item.outputs.push(row.output);
            }
        }
    }
    Ok(by_item)
}

/// Runs `item` from the first stage it has not passed (`passed` holds the
/// outputs of those it has) to its last, or until a stage fails or is held
/// back. Each accepted answer before the last is sent to `stages`.
pub(super) async fn run(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &CompiledJob,
    delivery: &Delivery,
    item: Item,
    passed: Passed,
    stages: &mpsc::UnboundedSender<ItemResult>,
) -> Result<Outcome, Error> {
    let mut outputs = serde_json::Map::new();
    let mut prior = item.prior;
    let last = job.stages.len() - 1;
    for (k, stage) in job.stages.iter().enumerate() {
        if let Some(output) = passed.outputs.get(k) {
            outputs.insert(stage.name.clone(), output.clone());
            continue;
        }
        // The stage's template sees the item's fields and `stages.NAME`.
        let mut payload = item.payload.clone();
        if let Value::Object(fields) = &mut payload {
            fields.insert("stages".into(), Value::Object(outputs.clone()));
        }
        let at = Item { seq: item.seq, id: item.id.clone(), payload, prior };
        let _call = tokio::select! {
            permit = shared.calls.acquire(&job.project, chunk.job_id) => permit,
            _ = delivery.stop().cancelled() => return Ok(Outcome::Held(Duration::ZERO)),
        };
        let mut ctx = item_context(shared, chunk, &stage.job, delivery);
        ctx.stage = k as i16;
        let mut r = match run_item(&ctx, &stage.job, &at, None).await? {
            Outcome::Done(r) => r,
            held @ Outcome::Held(_) => return Ok(held),
        };
        r.stage = Some(k as i16);
        if !r.succeeded {
            r.error = r.error.map(|e| format!("stage {} ({}): {e}", k + 1, stage.name));
            return Ok(Outcome::Done(r));
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
        prior = r.attempts;
        outputs.insert(stage.name.clone(), r.output.clone().unwrap_or(Value::Null));
        // The receiver lives as long as the chunk's work; if it is gone the
        // chunk is over and the answer is lost with it, as an unwritten one is.
        let _ = stages.send(*r);
    }
    // Only reached if every stage, the last included, was passed: the last
    // stage's answer is never a stage row, so this means the rows disagree
    // with the job's stages.
    let why = format!("the item has passed all {} stages but has no result", job.stages.len());
    Ok(Outcome::Done(Box::new(ItemResult::failed(&item, common::provider::ErrorClass::Template, why))))
}

//! The batch API client against the simulator's OpenAI and Anthropic batch endpoints: answers, partial failures, expiry, cancellation and refused files.

use std::collections::HashMap;
use std::time::Duration;

use common::provider::batch::{BatchItem, BatchState, BatchStatus};
use common::provider::{Call, ChatClient, Endpoint, MaxTokensParam, Message, OutputMode, ProviderKind};
use serde_json::json;
use sluice_tests::fixtures::{wait_for, SimServer};
use sluice_tests::sim::SimConfig;

fn client(sim: &SimServer, kind: ProviderKind) -> ChatClient {
    ChatClient::new(Endpoint {
        kind,
        base_url: sim.base_url(),
        api_version: None,
        anthropic_version: None,
        timeout: Duration::from_secs(30),
        pool_size: 4,
    })
    .unwrap()
}

/// Requests as `(custom_id, body)`, and the known label of each custom_id.
type Requests = (Vec<(String, Vec<u8>)>, HashMap<String, String>);

/// `count` classification requests over the sample documents, in `client`'s
/// dialect, with the documents' known labels by custom_id.
fn requests(client: &ChatClient, count: u64) -> Requests {
    let schema = json!({"type": "object", "properties": {"label": {"type": "string",
        "enum": ["business", "sports", "technology", "politics", "health"]}}, "required": ["label"]});
    let (mut out, mut expected) = (Vec::new(), HashMap::new());
    for i in 0..count {
        let doc = common::sample::document(7, i);
        let messages =
            [Message { role: "user".into(), content: format!("Document:\n{}", doc["text"].as_str().unwrap()) }];
        let call = Call {
            model: "sim-small",
            system: Some("Classify."),
            messages: &messages,
            temperature: Some(0.0),
            max_tokens: 20,
            max_tokens_param: MaxTokensParam::MaxTokens,
            output: OutputMode::JsonSchema,
            schema_name: "classify",
            schema: &schema,
            logprobs: false,
            n: None,
            reasoning_effort: None,
        };
        let id = doc["id"].as_str().unwrap().to_string();
        expected.insert(id.clone(), doc["expected"].as_str().unwrap().to_string());
        out.push((id, client.body(&call)));
    }
    (out, expected)
}

async fn ended(client: &ChatClient, id: &str) -> BatchStatus {
    wait_for("the batch to end", Duration::from_secs(30), || async {
        Ok(!matches!(client.batch_status(id, None).await?.state, BatchState::Pending))
    })
    .await
    .unwrap();
    client.batch_status(id, None).await.unwrap()
}

/// Tallies: (answered with the known label, failed, not run).
fn tally(items: &HashMap<String, BatchItem>, expected: &HashMap<String, String>) -> (usize, usize, usize) {
    let (mut right, mut failed, mut not_run) = (0, 0, 0);
    for (id, item) in items {
        match item {
            BatchItem::Answered(c) => {
                let v: serde_json::Value = serde_json::from_str(&c.content).unwrap();
                assert_eq!(v["label"].as_str(), Some(expected[id].as_str()), "{id}: {}", c.content);
                assert!(c.tokens_in > 0 && c.tokens_out > 0);
                right += 1;
            }
            BatchItem::Failed(e) => {
                assert_eq!(e.class().as_str(), "server", "{e}");
                failed += 1;
            }
            BatchItem::NotRun(_) => not_run += 1,
        }
    }
    (right, failed, not_run)
}

#[tokio::test]
async fn a_batch_is_answered_with_partial_failures_in_each_dialect() {
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let sim = SimServer::start(SimConfig { batch_seconds: 0.3, batch_fail: 0.1, seed: 3, ..Default::default() })
            .await
            .unwrap();
        let client = client(&sim, kind);
        let (reqs, expected) = requests(&client, 300);
        let id = client.submit_batch(&reqs, None, None).await.unwrap();
        assert_eq!(client.batch_status(&id, None).await.unwrap().state, BatchState::Pending, "{kind:?}");
        let status = ended(&client, &id).await;
        let items = client.batch_results(&status, None).await.unwrap();
        assert_eq!(items.len(), 300, "{kind:?}: every request has an outcome");
        let (right, failed, not_run) = tally(&items, &expected);
        assert_eq!((right + failed, not_run), (300, 0), "{kind:?}");
        assert!((10..=60).contains(&failed), "{kind:?}: {failed} of 300 failed, 10% were to");
        // Outside the live limits: the live request counter saw every batch request once.
        assert_eq!(sim.sim.stats().requests, 300 - failed as u64, "{kind:?}");
    }
}

#[tokio::test]
async fn an_expired_batch_keeps_what_it_ran_and_names_the_rest() {
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let sim = SimServer::start(SimConfig { batch_seconds: 0.2, batch_expire: 0.3, seed: 4, ..Default::default() })
            .await
            .unwrap();
        let client = client(&sim, kind);
        let (reqs, expected) = requests(&client, 200);
        let status = ended(&client, &client.submit_batch(&reqs, None, None).await.unwrap()).await;
        let want = if kind == ProviderKind::Anthropic { "ended" } else { "expired" };
        assert_eq!(status.state, BatchState::Ended { status: want.into() });
        let items = client.batch_results(&status, None).await.unwrap();
        let (right, failed, not_run) = tally(&items, &expected);
        assert_eq!((right + not_run, failed), (200, 0), "{kind:?}");
        assert!((30..=100).contains(&not_run), "{kind:?}: {not_run} of 200 expired, 30% were to");
        let reason = items.values().find_map(|i| match i {
            BatchItem::NotRun(r) => Some(r.clone()),
            _ => None,
        });
        let want = if kind == ProviderKind::Anthropic { "expired" } else { "batch_expired" };
        assert_eq!(reason.as_deref(), Some(want));
    }
}

#[tokio::test]
async fn a_cancelled_batch_ends_with_its_requests_not_run() {
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let sim = SimServer::start(SimConfig { batch_seconds: 600.0, ..Default::default() }).await.unwrap();
        let client = client(&sim, kind);
        let (reqs, expected) = requests(&client, 50);
        let id = client.submit_batch(&reqs, None, None).await.unwrap();
        client.cancel_batch(&id, None).await.unwrap();
        let status = ended(&client, &id).await;
        let items = client.batch_results(&status, None).await.unwrap();
        assert_eq!(tally(&items, &expected), (0, 0, 50), "{kind:?}");
    }
}

#[tokio::test]
async fn batches_that_break_the_rules_are_refused() {
    let sim = SimServer::start(SimConfig::default()).await.unwrap();
    let openai = client(&sim, ProviderKind::Openai);
    let (mut reqs, _) = requests(&openai, 3);
    reqs[2].0 = reqs[0].0.clone();
    // OpenAI takes the file and fails the batch in validation.
    let id = openai.submit_batch(&reqs, None, None).await.unwrap();
    let BatchState::Failed { errors } = ended(&openai, &id).await.state else { panic!("the batch should fail") };
    assert!(errors.contains("duplicate_custom_id") && errors.contains("\"line\":3"), "{errors}");
    // Anthropic refuses it at once.
    let anthropic = client(&sim, ProviderKind::Anthropic);
    let (mut reqs, _) = requests(&anthropic, 3);
    reqs[2].0 = reqs[0].0.clone();
    let err = anthropic.submit_batch(&reqs, None, None).await.unwrap_err();
    assert_eq!(err.class().as_str(), "invalid_request", "{err}");
    // Over the size cap, nothing is sent.
    let many: Vec<(String, Vec<u8>)> = (0..50_001).map(|i| (i.to_string(), b"{}".to_vec())).collect();
    assert!(openai.submit_batch(&many, None, None).await.unwrap_err().to_string().contains("1 to 50000"));
    assert_eq!(sim.sim.batches.created.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_openai_batch_is_found_by_its_label_among_many() {
    let sim = SimServer::start(SimConfig { batch_seconds: 600.0, ..Default::default() }).await.unwrap();
    let openai = client(&sim, ProviderKind::Openai);
    let (reqs, _) = requests(&openai, 2);
    // More batches than one page of the list holds, the wanted one early.
    let wanted = openai.submit_batch(&reqs, Some("job/3/0/1"), None).await.unwrap();
    for i in 0..120 {
        openai.submit_batch(&reqs, Some(&format!("other/{i}")), None).await.unwrap();
    }
    assert_eq!(openai.find_batch("job/3/0/1", None).await.unwrap().as_deref(), Some(wanted.as_str()));
    assert_eq!(openai.find_batch("job/3/0/2", None).await.unwrap(), None);
    // The list is the provider's: the label is in each batch's metadata.
    let page: serde_json::Value =
        reqwest::get(format!("{}/batches?limit=1", sim.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(page["data"][0]["metadata"]["sluice_batch"], "other/119");
    assert_eq!(page["has_more"], true);
    // Anthropic's batches carry no metadata: nothing to find.
    let anthropic = client(&sim, ProviderKind::Anthropic);
    let (reqs, _) = requests(&anthropic, 2);
    anthropic.submit_batch(&reqs, Some("job/3/0/1"), None).await.unwrap();
    assert_eq!(anthropic.find_batch("job/3/0/1", None).await.unwrap(), None);
}

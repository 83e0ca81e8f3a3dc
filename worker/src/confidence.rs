//! Confidence scores in [0, 1] for results, by the strategy of the job kind, with the components they were made of.

use common::provider::TokenLogprob;
use common::spec::ConfidenceStrategy;
use serde_json::{json, Value};

/// Factor applied to self-reported confidence: models overstate it.
pub const SELF_REPORT_DISCOUNT: f64 = 0.9;
/// Factor for an answer that needed a re-ask to pass validation.
pub const REPAIRED_PENALTY: f64 = 0.8;
/// Factor for an answer from a fallback model.
pub const FALLBACK_PENALTY: f64 = 0.9;

/// A confidence and how it was reached, stored as `confidence_detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub value: Option<f64>,
    pub detail: Value,
}

/// The probability the model gave `answer`, normalised over the allowed
/// `labels`: the token where the answer starts carries its own log-probability
/// and those of the alternatives (`top_logprobs`). Returns (normalised, raw).
pub fn label_probability(tokens: &[TokenLogprob], answer: &str, labels: &[String]) -> Option<(f64, f64)> {
    if tokens.is_empty() || answer.is_empty() {
        return None;
    }
    // Find the token at which the answer's text begins inside its JSON string.
    let content: String = tokens.iter().map(|t| t.token.as_str()).collect();
    let start = content.find(&format!("\"{answer}\"")).map(|i| i + 1)?;
    let mut offset = 0;
    let token = tokens.iter().find(|t| {
        let end = offset + t.token.len();
        let hit = start >= offset && start < end;
        offset = end;
        hit
    })?;
    let raw = token.logprob.exp();
    if !raw.is_finite() {
        return None;
    }
    // Probability of each other allowed label: the alternative token it starts with.
    let mut others = 0.0;
    for label in labels.iter().filter(|l| l.as_str() != answer) {
        let p = token
            .top_logprobs
            .iter()
            .filter(|t| {
                let tok = t.token.trim_start_matches('"');
                !tok.is_empty() && label.starts_with(tok) && !answer.starts_with(tok)
            })
            .map(|t| t.logprob.exp())
            .fold(0.0, f64::max);
        others += p;
    }
    let normalised = raw / (raw + others);
    normalised.is_finite().then_some((normalised, raw))
}

/// A model's own confidence from its output field, made usable: negative
/// values become 0, values in (1, 100] are read as percentages, larger ones
/// become 1; non-numbers and non-finite numbers are refused.
pub fn self_reported(v: Option<&Value>) -> Result<f64, String> {
    let x = match v {
        Some(Value::Number(n)) => n.as_f64().ok_or("not a number")?,
        Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| format!("{s:?} is not a number"))?,
        Some(other) => return Err(format!("{other} is not a number")),
        None => return Err("missing".into()),
    };
    if !x.is_finite() {
        return Err(format!("{x} is not finite"));
    }
    Ok(if x < 0.0 {
        0.0
    } else if x <= 1.0 {
        x
    } else if x <= 100.0 {
        x / 100.0
    } else {
        1.0
    })
}

/// The majority answer among samples and the share that agree with it (ties:
/// the earliest answer). `None` answers (invalid samples) count against it.
pub fn agreement(answers: &[Option<String>]) -> Option<(String, f64)> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for a in answers.iter().flatten() {
        match counts.iter_mut().find(|(x, _)| *x == a) {
            Some(c) => c.1 += 1,
            None => counts.push((a, 1)),
        }
    }
    let (best, n) = counts.iter().fold(None::<(&str, usize)>, |acc, &(a, n)| match acc {
        Some((_, m)) if m >= n => acc,
        _ => Some((a, n)),
    })?;
    Some((best.to_string(), n as f64 / answers.len() as f64))
}

/// Combines a raw score with penalties into the final confidence and its record.
pub fn score(
    strategy: ConfidenceStrategy,
    raw: Result<f64, String>,
    repaired: bool,
    fallback: bool,
    extra: Value,
) -> Scored {
    if strategy == ConfidenceStrategy::None {
        return Scored { value: None, detail: json!({"strategy": "none"}) };
    }
    let mut penalties = Vec::new();
    if repaired {
        penalties.push(json!({"reason": "repaired", "factor": REPAIRED_PENALTY}));
    }
    if fallback {
        penalties.push(json!({"reason": "fallback_model", "factor": FALLBACK_PENALTY}));
    }
    let factor = if repaired { REPAIRED_PENALTY } else { 1.0 } * if fallback { FALLBACK_PENALTY } else { 1.0 };
    let strategy_name = serde_json::to_value(strategy).unwrap_or(Value::Null);
    match raw {
        Ok(r) if r.is_finite() => {
            let value = (r * factor).clamp(0.0, 1.0);
            Scored {
                value: Some(value),
                detail: json!({"strategy": strategy_name, "raw": r, "penalties": penalties, "value": value, "components": extra}),
            }
        }
        Ok(r) => Scored {
            value: None,
            detail: json!({"strategy": strategy_name, "error": format!("{r} is not finite"), "components": extra}),
        },
        Err(e) => Scored { value: None, detail: json!({"strategy": strategy_name, "error": e, "components": extra}) },
    }
}

/// One ensemble member's answer, or why it has none.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    pub model: String,
    /// Its weight in the vote (`weights` in the stage, 1 by default).
    pub weight: f64,
    /// The answer and the model's own confidence in it (`None` when the
    /// stage computes none: then it counts as 1), or why it gave none (its
    /// breaker open, its calls failed).
    pub answer: Result<(String, Option<f64>), String>,
}

/// The outcome of an ensemble's vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The answer with the most weight, and the members who gave it (by
    /// index); `None` if no member answered.
    pub answer: Option<(String, Vec<usize>)>,
    pub scored: Scored,
}

/// The weighted majority of an ensemble: each member's vote counts its
/// weight times its own confidence; ties go to the answer of the member
/// listed first. The confidence is the winners' weighted confidence over
/// the weight of every member, those without an answer included, so it
/// falls with disagreement, with doubt, and with members missing. The
/// detail keeps who said what.
pub fn ensemble(votes: &[Vote]) -> Verdict {
    let total: f64 = votes.iter().map(|v| v.weight).sum();
    let mut tally: Vec<(String, f64, Vec<usize>)> = Vec::new();
    for (i, v) in votes.iter().enumerate() {
        if let Ok((answer, own)) = &v.answer {
            let w = v.weight * own.unwrap_or(1.0).clamp(0.0, 1.0);
            match tally.iter_mut().find(|(a, _, _)| a == answer) {
                Some(t) => {
                    t.1 += w;
                    t.2.push(i);
                }
                None => tally.push((answer.clone(), w, vec![i])),
            }
        }
    }
    // The first answer reached wins a tie: members are listed by preference.
    let best = tally.iter().fold(None::<&(String, f64, Vec<usize>)>, |best, t| match best {
        Some(b) if b.1 >= t.1 => Some(b),
        _ => Some(t),
    });
    let detail_votes: Vec<Value> = votes
        .iter()
        .map(|v| match &v.answer {
            Ok((a, c)) => json!({"model": v.model, "weight": v.weight, "answer": a, "confidence": c}),
            Err(why) => json!({"model": v.model, "weight": v.weight, "error": why}),
        })
        .collect();
    let Some((answer, weight, members)) = best.cloned() else {
        let detail = json!({"strategy": "ensemble", "votes": detail_votes, "error": "no member answered"});
        return Verdict { answer: None, scored: Scored { value: None, detail } };
    };
    let agreeing: f64 = members.iter().map(|&i| votes[i].weight).sum();
    let value = if total > 0.0 { weight / total } else { 0.0 };
    let detail = json!({
        "strategy": "ensemble",
        "answer": answer,
        "agreement": if total > 0.0 { agreeing / total } else { 0.0 },
        "answered": votes.iter().filter(|v| v.answer.is_ok()).count(),
        "members": votes.len(),
        "votes": detail_votes,
    });
    Verdict { answer: Some((answer, members)), scored: Scored { value: Some(value), detail } }
}

/// An ensemble's disagreement settled by an adjudicator model (`judge`,
/// asked with the members' answers): its answer wins, counted as one more
/// member of weight `judge.weight`, so the confidence is the judge's and
/// the agreeing members' weighted confidence over every member's weight and
/// the judge's. A judge without an answer leaves the vote as it was, the
/// detail saying why.
pub fn adjudicate(votes: &[Vote], judge: &Vote) -> Verdict {
    let mut verdict = ensemble(votes);
    let Ok((answer, own)) = &judge.answer else {
        let why = judge.answer.as_ref().err().cloned().unwrap_or_default();
        verdict.scored.detail["adjudicator"] = json!({"model": judge.model, "error": why});
        return verdict;
    };
    let total: f64 = votes.iter().map(|v| v.weight).sum::<f64>() + judge.weight;
    let agreeing: Vec<usize> =
        (0..votes.len()).filter(|&i| votes[i].answer.as_ref().is_ok_and(|(a, _)| a == answer)).collect();
    let weighted: f64 = agreeing
        .iter()
        .map(|&i| votes[i].weight * votes[i].answer.as_ref().map_or(0.0, |(_, c)| c.unwrap_or(1.0).clamp(0.0, 1.0)))
        .sum::<f64>()
        + judge.weight * own.unwrap_or(1.0).clamp(0.0, 1.0);
    let agreement = (agreeing.iter().map(|&i| votes[i].weight).sum::<f64>() + judge.weight) / total;
    let detail = &mut verdict.scored.detail;
    detail["answer"] = json!(answer);
    detail["agreement"] = json!(agreement);
    detail["adjudicator"] = json!({"model": judge.model, "weight": judge.weight, "answer": answer, "confidence": own});
    verdict.scored.value = Some(weighted / total);
    verdict.answer = Some((answer.clone(), agreeing));
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::provider::TopLogprob;

    fn labels() -> Vec<String> {
        ["business", "sports", "health"].iter().map(|s| s.to_string()).collect()
    }

    fn tokens(label: &str, p: f64, alts: &[(&str, f64)]) -> Vec<TokenLogprob> {
        let top = alts.iter().map(|(t, p)| TopLogprob { token: t.to_string(), logprob: p.ln() }).collect();
        vec![
            TokenLogprob { token: "{\"label\":\"".into(), logprob: 0.0, top_logprobs: vec![] },
            TokenLogprob { token: label.into(), logprob: p.ln(), top_logprobs: top },
            TokenLogprob { token: "\"}".into(), logprob: 0.0, top_logprobs: vec![] },
        ]
    }

    #[test]
    fn logprobs_are_normalised_over_the_allowed_labels() {
        let check = |t: Vec<TokenLogprob>, answer: &str, expected: Option<f64>| {
            let got = label_probability(&t, answer, &labels()).map(|(n, _)| n);
            match (got, expected) {
                (Some(g), Some(e)) => assert!((g - e).abs() < 1e-9, "{g} != {e}"),
                (g, e) => assert_eq!(g, e),
            }
        };
        // 0.6 for sports, 0.2 business, 0.1 for a token that is no label.
        check(tokens("sports", 0.6, &[("sports", 0.6), ("business", 0.2), ("xyz", 0.1)]), "sports", Some(0.75));
        // Labels split into several tokens: the first token stands for the label.
        check(tokens("spo", 0.5, &[("spo", 0.5), ("bus", 0.5)]), "sports", None);
        check(tokens("sports", 0.9, &[]), "sports", Some(1.0));
        check(Vec::new(), "sports", None);
        check(tokens("sports", 0.9, &[]), "health", None);
    }

    #[test]
    fn self_reported_values_are_made_usable() {
        let check = |v: Value, expected: Result<f64, ()>| {
            assert_eq!(self_reported(Some(&v)).map_err(|_| ()), expected, "{v}");
        };
        check(json!(0.8), Ok(0.8));
        check(json!(-0.3), Ok(0.0));
        check(json!(85), Ok(0.85));
        check(json!(1e9), Ok(1.0));
        check(json!("0.4"), Ok(0.4));
        check(json!("NaN"), Err(()));
        check(json!("inf"), Err(()));
        check(json!(null), Err(()));
        check(json!([1]), Err(()));
        assert!(self_reported(None).is_err());
    }

    #[test]
    fn agreement_is_the_majority_share() {
        let a = |v: &[Option<&str>]| v.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
        assert_eq!(agreement(&a(&[Some("x"), Some("y"), Some("x")])), Some(("x".into(), 2.0 / 3.0)));
        assert_eq!(agreement(&a(&[Some("x"), None, None, Some("y")])), Some(("x".into(), 0.25)));
        assert_eq!(agreement(&a(&[None, None])), None);
    }

    #[test]
    fn penalties_lower_the_score_and_bad_values_give_none() {
        let s = score(ConfidenceStrategy::Logprobs, Ok(0.9), true, true, Value::Null);
        assert!((s.value.unwrap() - 0.9 * 0.8 * 0.9).abs() < 1e-12);
        assert_eq!(s.detail["penalties"].as_array().unwrap().len(), 2);
        assert_eq!(score(ConfidenceStrategy::SelfReported, Ok(f64::NAN), false, false, Value::Null).value, None);
        assert_eq!(score(ConfidenceStrategy::SelfReported, Ok(1.7), false, false, Value::Null).value, Some(1.0));
        assert_eq!(
            score(ConfidenceStrategy::Logprobs, Err("no logprobs".into()), false, false, Value::Null).value,
            None
        );
        assert_eq!(score(ConfidenceStrategy::None, Ok(0.1), false, false, Value::Null).value, None);
    }

    fn vote(model: &str, answer: Result<(&str, Option<f64>), &str>) -> Vote {
        Vote { model: model.into(), weight: 1.0, answer: answer.map(|(a, c)| (a.to_string(), c)).map_err(String::from) }
    }

    #[test]
    fn an_ensemble_agreeing_is_as_sure_as_its_members() {
        let v =
            ensemble(&[vote("a", Ok(("x", Some(0.9)))), vote("b", Ok(("x", Some(0.9)))), vote("c", Ok(("x", None)))]);
        assert_eq!(v.answer, Some(("x".to_string(), vec![0, 1, 2])));
        assert!((v.scored.value.unwrap() - 2.8 / 3.0).abs() < 1e-12);
        assert_eq!(v.scored.detail["agreement"], 1.0);
        assert_eq!(v.scored.detail["votes"][1]["model"], "b");
    }

    #[test]
    fn a_confident_minority_lowers_a_doubtful_majority() {
        // Two members sure of x, one unsure of y: x, fairly sure.
        let sure = ensemble(&[
            vote("a", Ok(("x", Some(0.9)))),
            vote("b", Ok(("x", Some(0.9)))),
            vote("c", Ok(("y", Some(0.5)))),
        ]);
        assert_eq!(sure.answer.as_ref().unwrap().0, "x");
        assert!((sure.scored.value.unwrap() - 0.6).abs() < 1e-12);
        // Two members unsure of y, one sure of x: y by a little, and doubtful.
        let doubt = ensemble(&[
            vote("a", Ok(("y", Some(0.5)))),
            vote("b", Ok(("x", Some(0.9)))),
            vote("c", Ok(("y", Some(0.5)))),
        ]);
        assert_eq!(doubt.answer, Some(("y".to_string(), vec![0, 2])));
        assert!((doubt.scored.value.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((doubt.scored.detail["agreement"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn an_adjudicator_settles_a_split_and_counts_as_one_more_member() {
        let split = [vote("a", Ok(("x", Some(0.9)))), vote("b", Ok(("y", Some(0.9))))];
        // The judge sides with b: y wins, whatever the order.
        let v = adjudicate(&split, &vote("judge", Ok(("y", Some(0.6)))));
        assert_eq!(v.answer, Some(("y".to_string(), vec![1])));
        assert!((v.scored.value.unwrap() - 1.5 / 3.0).abs() < 1e-12);
        assert!((v.scored.detail["agreement"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(v.scored.detail["adjudicator"]["answer"], "y");
        assert_eq!(v.scored.detail["votes"].as_array().unwrap().len(), 2);
        // A third answer of its own: it wins alone, with little confidence.
        let v = adjudicate(&split, &vote("judge", Ok(("z", None))));
        assert_eq!(v.answer, Some(("z".to_string(), vec![])));
        assert!((v.scored.value.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // A judge without an answer leaves the vote, and says so.
        let v = adjudicate(&split, &vote("judge", Err("breaker open")));
        assert_eq!(v.answer.unwrap().0, "x");
        assert_eq!(v.scored.detail["adjudicator"]["error"], "breaker open");
    }

    #[test]
    fn missing_members_count_against_the_confidence_and_ties_go_to_the_first() {
        let v = ensemble(&[vote("a", Err("breaker open")), vote("b", Ok(("x", None))), vote("c", Ok(("x", None)))]);
        assert_eq!(v.answer.as_ref().unwrap().0, "x");
        assert!((v.scored.value.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(v.scored.detail["votes"][0]["error"], "breaker open");
        assert_eq!(v.scored.detail["answered"], 2);
        let tie = ensemble(&[vote("a", Ok(("y", None))), vote("b", Ok(("x", None)))]);
        assert_eq!(tie.answer.unwrap().0, "y");
        let none = ensemble(&[vote("a", Err("down")), vote("b", Err("down"))]);
        assert_eq!((none.answer, none.scored.value), (None, None));
        // Weights count.
        let mut heavy = vote("b", Ok(("x", None)));
        heavy.weight = 3.0;
        let w = ensemble(&[vote("a", Ok(("y", None))), heavy, vote("c", Ok(("y", None)))]);
        assert_eq!(w.answer.unwrap().0, "x");
        assert!((w.scored.value.unwrap() - 0.6).abs() < 1e-12);
    }
}

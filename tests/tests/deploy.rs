//! The deployment files checked with the real tools: Kubernetes manifests rendered by kustomize and validated against the Kubernetes and KEDA schemas, alert rules through promtool, and every metric the dashboard and the rules query one Sluice exports.

use std::collections::BTreeSet;
use std::process::Command;

use sluice_tests::tools::{repo, run, tool};

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_and_keda_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = Vec::new();
    for overlay in ["dev", "production"] {
        let path = repo().join("deploy/kubernetes/overlays").join(overlay);
        let yaml = run(Command::new(tool("SLUICE_KUSTOMIZE")).arg("build").arg(&path));
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        // What the issue asks of every pod, rendered: checked here as well as by the schemas.
        for needle in [
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "type: RuntimeDefault",
            "kind: PodDisruptionBudget",
            "kind: NetworkPolicy",
            "kind: ScaledObject",
            "path: /readyz",
        ] {
            assert!(yaml.contains(needle), "{overlay}: no {needle:?}");
        }
        assert!(!yaml.contains("kind: Secret"), "{overlay}: Secrets are referenced, never rendered");
        rendered.push(file);
    }
    let out = run(Command::new("python3")
        .arg(repo().join("scripts/deploy-check/validate_manifests.py"))
        .arg("1.30.0")
        .args(&rendered)
        .env("PYTHONPATH", tool("SLUICE_DEPLOY_CHECK_PYTHONPATH")));
    assert!(out.contains("ok      ") && out.contains("ScaledObject/sluice-worker"), "{out}");
    assert!(!out.contains("INVALID"), "{out}");
}

#[test]
fn a_broken_manifest_is_refused() {
    // The validation must be able to fail: an unknown field and a wrong type.
    let dir = tempfile::tempdir().unwrap();
    let path = repo().join("deploy/kubernetes/overlays/dev");
    let yaml = run(Command::new(tool("SLUICE_KUSTOMIZE")).arg("build").arg(&path))
        .replacen("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", 1)
        .replace("minReplicaCount: 0", "minReplicaCount: zero");
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("python3")
        .arg(repo().join("scripts/deploy-check/validate_manifests.py"))
        .arg("1.30.0")
        .arg(&file)
        .env("PYTHONPATH", tool("SLUICE_DEPLOY_CHECK_PYTHONPATH"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("readOnlyRootFilesytem") && text.contains("minReplicaCount"), "{text}");
}

#[test]
fn the_kustomize_price_table_is_deploy_prices() {
    let a = std::fs::read_to_string(repo().join("deploy/prices.toml")).unwrap();
    let b = std::fs::read_to_string(repo().join("deploy/kubernetes/base/prices.toml")).unwrap();
    assert!(a == b, "copy deploy/prices.toml to deploy/kubernetes/base/prices.toml");
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let promtool = tool("SLUICE_PROMTOOL");
    let checked = run(Command::new(&promtool).args(["check", "rules", "sluice-rules.yml"]).current_dir(&dir));
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = run(Command::new(&promtool).args(["test", "rules", "sluice-rules.test.yml"]).current_dir(&dir));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The metric names in a PromQL expression (histogram series map to their histogram).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("sluice_") {
        let start = i + at;
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        // Part of a longer identifier, or a quoted label value, is not a metric.
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || matches!(bytes[start - 1], b'_' | b'"')) {
            let name = &expr[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|base| base.ends_with("_seconds")))
                .unwrap_or(name);
            into.insert(name.to_string());
        }
        i = end;
    }
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Every `expr:` of a rule file (one line, or an indented block after `|`).
fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else { continue };
        let indent = line.len() - trimmed.len();
        let mut expr = rest.trim().trim_start_matches('|').to_string();
        for next in &lines[i + 1..] {
            let t = next.trim_start();
            if !t.is_empty() && next.len() - t.len() <= indent {
                break;
            }
            expr.push(' ');
            expr.push_str(t);
        }
        out.push(expr);
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_the_rules_query_is_one_sluice_exports() {
    let exported: BTreeSet<String> =
        coordinator::metrics::ALL.iter().chain(worker::metrics::ALL).map(|s| s.to_string()).collect();

    // docs/metrics.md's table lists exactly what the code exports.
    let docs = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let documented: BTreeSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `sluice_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("sluice_{n}"))
        .collect();
    assert_eq!(documented, exported, "docs/metrics.md's table and the code differ");

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/sluice-dashboard.json")).unwrap())
            .unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/sluice-rules.yml")).unwrap();
    let rule_exprs = rule_exprs(&rules);
    assert_eq!(rule_exprs.len(), 7, "{rule_exprs:?}");
    let keda = std::fs::read_to_string(repo().join("deploy/kubernetes/base/keda-scaledobject.yaml")).unwrap();
    let keda_query = keda.lines().find_map(|l| l.trim().strip_prefix("query:")).unwrap().to_string();
    let mut queried = BTreeSet::new();
    for e in exprs.iter().chain(&rule_exprs).chain([&keda_query]) {
        metric_names(e, &mut queried);
    }
    assert!(exprs.len() >= 20 && queried.len() >= 15, "{} queries, {queried:?}", exprs.len());
    let unknown: Vec<_> = queried.difference(&exported).collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}");
}

#[test]
fn metric_names_are_found_in_promql() {
    let mut n = BTreeSet::new();
    metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(sluice_model_call_duration_seconds_bucket{x="sluice_no"}[5m]))) / sluice_items_total"#,
        &mut n,
    );
    let expected: BTreeSet<String> =
        ["sluice_items_total", "sluice_model_call_duration_seconds"].iter().map(|s| s.to_string()).collect();
    assert_eq!(n, expected, "the histogram's series named by the histogram, the label value left out");
}

/// The fields serde accepts in a `job.toml` (or in one of its stages, with
/// `stage`): the list its refusal of an unknown field gives.
fn accepted_fields(stage: bool) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let toml = if stage { "[[stages]]\nzzz_not_a_field = 1\n" } else { "zzz_not_a_field = 1\n" };
    std::fs::write(dir.path().join("job.toml"), toml).unwrap();
    let err = common::spec::JobKind::load(dir.path()).unwrap_err();
    let chain: Vec<String> =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source()).map(|e| e.to_string()).collect();
    let text = chain.join(" ");
    let list = text.split("expected one of").nth(1).unwrap_or_else(|| panic!("no field list in: {text}"));
    list.split('`').skip(1).step_by(2).map(String::from).collect()
}

/// The field names in the first column of a table of docs/job-kinds.md,
/// the table under `heading`.
fn documented_fields(doc: &str, heading: &str) -> BTreeSet<String> {
    let section = doc.split(heading).nth(1).unwrap_or_else(|| panic!("no section {heading}"));
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect()
}

#[test]
fn the_job_kind_reference_lists_every_field() {
    let doc = std::fs::read_to_string(repo().join("docs/job-kinds.md")).unwrap();
    let kind = accepted_fields(false);
    assert!(kind.contains("answer_field") && kind.contains("stages"), "{kind:?}");
    assert_eq!(documented_fields(&doc, "## The kind"), kind, "docs/job-kinds.md's kind fields and JobSpec differ");
    let stage = accepted_fields(true);
    assert!(stage.contains("type") && stage.contains("segment_tokens"), "{stage:?}");
    assert_eq!(documented_fields(&doc, "## A stage"), stage, "docs/job-kinds.md's stage fields and StageSpec differ");
}

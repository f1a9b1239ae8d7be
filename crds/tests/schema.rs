//! The committed CRDs match the types, and their validation rules accept and refuse what
//! they should (evaluated with the Kubernetes CEL library, client side).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use serf_operator_crds::{SerfEventTrigger, SerfHandler, crd_files};

#[test]
fn committed_crds_are_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(serf_operator_crds::CHART_CRD_DIR);
    for (name, yaml) in crd_files().unwrap() {
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            committed == yaml,
            "{name} is stale: run `cargo run -p serf-operator -- crds` and commit the result"
        );
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = crd_files().unwrap().into_iter().map(|(n, _)| n).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "files in the CRD directory that no type generates"
    );
}

#[test]
fn names_columns_and_subresources() {
    let crd = SerfHandler::crd();
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["sh".to_string()][..])
    );
    assert_eq!(
        crd.spec.names.categories.as_deref(),
        Some(&["serf".to_string()][..])
    );
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["Role", "Routes", "Ready", "Reason", "Age"]);
    let crd = SerfEventTrigger::crd();
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["set".to_string()][..])
    );
    assert_eq!(crd.spec.scope, "Namespaced");
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let s = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(s).unwrap()
}

fn check(schema: &Value, object: Value) -> Result<(), String> {
    kube::core::cel::Validator::new()
        .validate(schema, &object, None)
        .map_err(|e| e.to_string())
}

fn handler(routes: Value) -> Value {
    json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfHandler",
        "metadata": {"name": "h", "namespace": "apps"},
        "spec": {"role": "web", "routes": routes}
    })
}

fn job() -> Value {
    json!({"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}})
}

#[test]
fn handler_rules() {
    let schema = schema_of(&SerfHandler::crd());
    check(&schema, handler(json!([
        {"name": "deploy", "events": "user:deploy", "job": job()},
        {"name": "where", "events": "query:where", "respond": {"payload": "$(SERF_SELF_NAME)"}},
        {"name": "db-failed", "events": "member-failed,member-leave", "members": {"role": "db"}, "coalesce": "10s", "job": job()},
    ]))).unwrap();

    let err = check(
        &schema,
        handler(json!([
            {"name": "a", "events": "user", "job": job()},
            {"name": "a", "events": "query", "respond": {"payload": "x"}},
        ])),
    )
    .unwrap_err();
    assert!(err.contains("route names must be unique"), "{err}");

    let err = check(
        &schema,
        handler(json!([
            {"name": "a", "events": "query", "job": job(), "respond": {"payload": "x"}},
        ])),
    )
    .unwrap_err();
    assert!(err.contains("exactly one action"), "{err}");
    let err = check(&schema, handler(json!([{"name": "a", "events": "query"}]))).unwrap_err();
    assert!(err.contains("exactly one action"), "{err}");

    // A job route's query answer and agent access; neither on a respond route.
    check(&schema, handler(json!([
        {"name": "a", "events": "query:load", "job": job(), "answer": "JobName",
         "agent": {"rpcAddr": "serf-rpc.serf-system.svc:7373", "rpcAuthSecret": {"name": "s", "key": "k"}}},
    ]))).unwrap();
    let err = check(
        &schema,
        handler(json!([
            {"name": "a", "events": "query", "respond": {"payload": "x"}, "answer": "Output"},
        ])),
    )
    .unwrap_err();
    assert!(err.contains("answer is for job routes"), "{err}");
    let err = check(&schema, handler(json!([
        {"name": "a", "events": "query", "respond": {"payload": "x"}, "agent": {"rpcAddr": "a:1"}},
    ]))).unwrap_err();
    assert!(err.contains("agent is for job routes"), "{err}");
    check(
        &schema,
        handler(json!([
            {"name": "a", "events": "user:deploy", "job": job(),
             "report": {"event": "deploy-done", "payload": "$(JOB_NAME) $(JOB_OUTCOME)"}},
        ])),
    )
    .unwrap();
    let err = check(&schema, handler(json!([
        {"name": "a", "events": "query", "respond": {"payload": "x"}, "report": {"event": "e", "payload": ""}},
    ]))).unwrap_err();
    assert!(err.contains("report is for job routes"), "{err}");
    let err = check(&schema, handler(json!([
        {"name": "a", "events": "user", "job": job(), "report": {"event": "e".repeat(100), "payload": "p".repeat(420)}},
    ]))).unwrap_err();
    assert!(err.contains("512 bytes at most"), "{err}");
    let route = &SerfHandler::crd().spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
        .properties
        .as_ref()
        .unwrap()["spec"]
        .properties
        .as_ref()
        .unwrap()["routes"]
        .items
        .clone();
    let route = serde_json::to_value(route).unwrap();
    assert_eq!(
        route["properties"]["answer"]["enum"],
        json!(["Output", "JobName", "None"]),
        "{route}"
    );
    assert!(route["properties"]["agent"]["properties"]["rpcAddr"]["pattern"].is_string());

    let err = check(
        &schema,
        handler(json!([
            {"name": "a", "events": "user:deploy", "respond": {"payload": "x"}},
        ])),
    )
    .unwrap_err();
    assert!(err.contains("respond answers queries only"), "{err}");

    let err = check(
        &schema,
        handler(json!([
            {"name": "a", "events": "user:deploy", "members": {"role": "db"}, "job": job()},
        ])),
    )
    .unwrap_err();
    assert!(err.contains("member events only"), "{err}");
}

#[test]
fn filter_pattern_is_serf_syntax() {
    let re = regex::Regex::new(serf_operator_crds::schema::EVENT_FILTER_PATTERN).unwrap();
    for ok in [
        "*",
        "user",
        "user:deploy",
        "query:where",
        "member-*",
        "member-join,member-failed",
        "user:a-b.c,query",
    ] {
        assert!(re.is_match(ok), "{ok}");
    }
    for bad in [
        "",
        "users",
        "user, query",
        "member-teleport",
        "user:a,",
        ",user",
        "query:",
    ] {
        assert!(!re.is_match(bad), "{bad:?}");
    }
}

fn trigger(spec: Value) -> Value {
    json!({
        "apiVersion": "serf.operator.io/v1alpha1", "kind": "SerfEventTrigger",
        "metadata": {"name": "t", "namespace": "apps"},
        "spec": spec
    })
}

#[test]
fn trigger_rules() {
    let schema = schema_of(&SerfEventTrigger::crd());
    check(
        &schema,
        trigger(json!({"event": {"name": "deploy", "payload": "v1.2.3"}})),
    )
    .unwrap();
    check(&schema, trigger(json!({"query": {"name": "load", "filterTags": {"role": "db"}, "timeout": "5s"}, "schedule": "*/5 * * * *"}))).unwrap();

    let err = check(
        &schema,
        trigger(json!({"event": {"name": "a"}, "query": {"name": "b"}})),
    )
    .unwrap_err();
    assert!(err.contains("exactly one of event or query"), "{err}");
    let err = check(&schema, trigger(json!({}))).unwrap_err();
    assert!(err.contains("exactly one of event or query"), "{err}");

    // 470 bytes fit; 471 do not. Multi-byte characters count as bytes, as Serf counts them.
    check(
        &schema,
        trigger(json!({"event": {"name": "n", "payload": "x".repeat(469)}})),
    )
    .unwrap();
    let err = check(
        &schema,
        trigger(json!({"event": {"name": "n", "payload": "x".repeat(470)}})),
    )
    .unwrap_err();
    assert!(err.contains("user event limit"), "{err}");
    let err = check(
        &schema,
        trigger(json!({"event": {"name": "n", "payload": "é".repeat(240)}})),
    )
    .unwrap_err();
    assert!(err.contains("user event limit"), "{err}");

    let err = check(&schema, trigger(json!({"query": {"name": "_serf_ping"}}))).unwrap_err();
    assert!(err.contains("reserved"), "{err}");
    let err = check(
        &schema,
        trigger(json!({"query": {"name": "q", "payload": "x".repeat(900)}})),
    )
    .unwrap_err();
    assert!(err.contains("query limit"), "{err}");
}

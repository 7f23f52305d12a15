//! Bad requests against a real gateway on real etcd, over raw HTTPS with the admin token (and
//! once through kubectl): each is refused with the right HTTP code and a Kubernetes `Status`
//! body, and stores nothing.

use anyhow::{ensure, Context};
use karri_e2e::support::{
    expect_status, instance_json, instance_yaml, kubectl_err, message, Api, Cluster, API,
};
use karri_testkit::kubectl_ok;
use reqwest::header::{ACCEPT, CONNECTION, CONTENT_TYPE, WARNING};
use reqwest::Method;
use serde_json::{json, Value};

fn instances() -> String {
    format!("{API}/namespaces/acme/instances")
}

fn instance(name: &str) -> String {
    format!("{API}/namespaces/acme/instances/{name}")
}

/// Every instance in every namespace, as the admin sees them.
async fn all_instances(api: &Api) -> anyhow::Result<Vec<Value>> {
    api.items(&format!("{API}/instances")).await
}

async fn ensure_nothing_stored(api: &Api) -> anyhow::Result<()> {
    let items = all_instances(api).await?;
    ensure!(
        items.is_empty(),
        "a refused request stored something: {items:?}"
    );
    Ok(())
}

async fn post_json(api: &Api, body: &Value, query: &str) -> anyhow::Result<reqwest::Response> {
    Ok(api
        .request(Method::POST, &format!("{}{query}", instances()))
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body)?)
        .send()
        .await?)
}

/// PATCHes instance `name` with `patch` of media type `ct`.
async fn send_patch(
    api: &Api,
    name: &str,
    ct: &str,
    patch: &Value,
) -> anyhow::Result<reqwest::Response> {
    Ok(api
        .request(Method::PATCH, &instance(name))
        .header(CONTENT_TYPE, ct)
        .body(serde_json::to_vec(patch)?)
        .send()
        .await?)
}

/// Creates instance `name` and returns it as stored.
async fn create(api: &Api, name: &str) -> anyhow::Result<Value> {
    let resp = post_json(api, &instance_json(name), "").await?;
    let code = resp.status();
    let text = resp.text().await?;
    ensure!(code == 201, "creating {name}: {code} {text}");
    Ok(serde_json::from_str(&text)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_a_bad_request() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let resp = api
        .request(Method::POST, &instances())
        .header(CONTENT_TYPE, "application/json")
        .body(
            r#"{"apiVersion": "karri.dev/v1alpha1", "kind": "Instance", "metadata": {"name": "a""#,
        )
        .send()
        .await?;
    let status = expect_status(resp, 400, "BadRequest").await?;
    ensure!(
        message(&status).contains("JSON"),
        "the message does not say the JSON is bad: {status}"
    );
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_for_media_the_gateway_does_not_serve_is_not_acceptable_and_stores_nothing(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "kept").await?;
    let resp = api
        .request(Method::GET, &instances())
        .header(ACCEPT, "text/html")
        .send()
        .await?;
    let status = expect_status(resp, 406, "NotAcceptable").await?;
    ensure!(
        message(&status).contains("application/json"),
        "the message does not say what is served: {status}"
    );
    // A create is refused before it is made, as kube-apiserver negotiates first (it serves no
    // protobuf for a custom resource).
    let resp = api
        .request(Method::POST, &instances())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/vnd.kubernetes.protobuf")
        .body(serde_json::to_vec(&instance_json("refused"))?)
        .send()
        .await?;
    expect_status(resp, 406, "NotAcceptable").await?;
    // A watch has no YAML stream.
    let resp = api
        .request(Method::GET, &format!("{}?watch=true", instances()))
        .header(ACCEPT, "application/yaml")
        .send()
        .await?;
    let status = expect_status(resp, 406, "NotAcceptable").await?;
    ensure!(
        message(&status).contains("application/json;stream=watch"),
        "the message does not say what a watch is served in: {status}"
    );
    let names: Vec<Value> = all_instances(&api)
        .await?
        .iter()
        .map(|i| i["metadata"]["name"].clone())
        .collect();
    ensure!(names == [json!("kept")], "stored: {names:?}");
    // A caller without the right learns that first, as kube-apiserver authorizes first.
    let acme = c.api(Some(c.tokens.account("acme").context("no token for acme")?))?;
    let resp = acme
        .request(Method::GET, &format!("{API}/namespaces/globex/instances"))
        .header(ACCEPT, "text/html")
        .send()
        .await?;
    expect_status(resp, 403, "Forbidden").await?;
    // A browser's header ends in a wildcard, and gets JSON.
    let resp = api
        .request(Method::GET, &instance("kept"))
        .header(ACCEPT, "text/html,application/xhtml+xml,*/*;q=0.8")
        .send()
        .await?;
    ensure!(resp.status() == 200, "a wildcard got {}", resp.status());
    let got: Value = resp.json().await?;
    ensure!(got["metadata"]["name"] == "kept", "{got}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_asks_for_yaml_gets_the_same_answers_in_yaml() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let created = create(&api, "web").await?;
    let yaml_of = |resp: reqwest::Response| async move {
        let code = resp.status().as_u16();
        let media = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.text().await?;
        ensure!(media == "application/yaml", "answered as {media:?}: {text}");
        let v: Value =
            serde_norway::from_str(&text).with_context(|| format!("not YAML: {text}"))?;
        anyhow::Ok((code, v))
    };
    let get = |path: String| {
        api.request(Method::GET, &path)
            .header(ACCEPT, "application/yaml")
            .send()
    };
    let (code, got) = yaml_of(get(instance("web")).await?).await?;
    ensure!(
        code == 200 && got == created,
        "{code}: {got} is not {created}"
    );
    let (code, list) = yaml_of(get(instances()).await?).await?;
    ensure!(code == 200 && list["items"][0] == created, "{code}: {list}");
    // A refusal is a Status, in YAML too.
    let (code, status) = yaml_of(get(instance("absent")).await?).await?;
    ensure!(
        code == 404 && status["kind"] == "Status" && status["reason"] == "NotFound",
        "{code}: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_yaml_is_a_bad_request() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let resp = api
        .request(Method::POST, &instances())
        .header(CONTENT_TYPE, "application/yaml")
        .body("apiVersion: karri.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: [a\nspec: {\n")
        .send()
        .await?;
    let status = expect_status(resp, 400, "BadRequest").await?;
    ensure!(
        message(&status).contains("YAML"),
        "the message does not say the YAML is bad: {status}"
    );
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_field_with_strict_validation_is_a_bad_request_naming_it() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let mut body = instance_json("a");
    body["spec"]["bogusField"] = json!(1);
    let resp = post_json(&api, &body, "?fieldValidation=Strict").await?;
    let status = expect_status(resp, 400, "BadRequest").await?;
    ensure!(
        message(&status).contains(r#"unknown field "spec.bogusField""#),
        "the message does not name the field: {status}"
    );
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_field_without_strict_validation_is_pruned_with_a_warning() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let mut body = instance_json("a");
    body["spec"]["bogusField"] = json!(1);
    let resp = post_json(&api, &body, "").await?;
    let code = resp.status().as_u16();
    let warnings: Vec<String> = resp
        .headers()
        .get_all(WARNING)
        .iter()
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .collect();
    let created: Value = serde_json::from_str(&resp.text().await?)?;
    ensure!(code == 201, "expected 201, got {code}: {created}");
    ensure!(
        warnings
            .iter()
            .any(|w| w.starts_with("299 ") && w.contains("bogusField")),
        "no Warning header naming the field: {warnings:?}"
    );
    ensure!(
        created["spec"].get("bogusField").is_none(),
        "the answer keeps the unknown field: {created}"
    );
    let stored = api.get_json(&instance("a")).await?;
    ensure!(
        stored["spec"].get("bogusField").is_none(),
        "the unknown field was stored: {stored}"
    );
    ensure!(stored["spec"]["instanceType"] == "m1.small", "{stored}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_api_version_is_a_bad_request() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let mut body = instance_json("a");
    body["apiVersion"] = json!("karri.dev/v9");
    let status = expect_status(post_json(&api, &body, "").await?, 400, "BadRequest").await?;
    let m = message(&status);
    ensure!(
        m.contains("karri.dev/v9") && m.contains("karri.dev/v1alpha1"),
        "the message does not name both versions: {status}"
    );
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_kind_is_a_bad_request() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let mut body = instance_json("a");
    body["kind"] = json!("Image");
    let status = expect_status(post_json(&api, &body, "").await?, 400, "BadRequest").await?;
    let m = message(&status);
    ensure!(
        m.contains("Image") && m.contains("Instance"),
        "the message does not name both kinds: {status}"
    );
    ensure_nothing_stored(&api).await
}

async fn name_is_invalid(name: &str) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let body = instance_json(name);
    let status = expect_status(post_json(&api, &body, "").await?, 422, "Invalid").await?;
    ensure!(
        message(&status).contains("metadata.name"),
        "the message does not name metadata.name: {status}"
    );
    let causes = status["details"]["causes"]
        .as_array()
        .context("an Invalid Status without details.causes")?;
    ensure!(
        causes.iter().any(|c| c["field"] == "metadata.name"),
        "no cause for metadata.name: {status}"
    );
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn name_longer_than_253_characters_is_invalid() -> anyhow::Result<()> {
    name_is_invalid(&"a".repeat(254)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn name_with_capitals_and_underscore_is_invalid() -> anyhow::Result<()> {
    name_is_invalid("Bad_Name").await
}

#[tokio::test(flavor = "multi_thread")]
async fn body_larger_than_the_limit_is_refused_as_too_large() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let mut body = instance_json("huge");
    body["metadata"]["annotations"] = json!({"example.org/blob": "x".repeat(4 * 1024 * 1024)});
    let bytes = serde_json::to_vec(&body)?;
    ensure!(bytes.len() > 4 * 1024 * 1024);
    let resp = api
        .request(Method::POST, &instances())
        .header(CONTENT_TYPE, "application/json")
        .body(bytes)
        .send()
        .await
        .context("sending a 4 MiB body")?;
    expect_status(resp, 413, "RequestEntityTooLarge").await?;
    // A fresh client: the connection of the refused request is the next test's subject.
    ensure_nothing_stored(&c.admin_api()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_stays_usable_or_is_closed_cleanly_after_a_too_large_body() -> anyhow::Result<()>
{
    let c = Cluster::start().await?;
    // One client, so the next request goes over the kept-alive connection when there is one.
    let api = c.admin_api()?;
    let mut body = instance_json("huge");
    body["metadata"]["annotations"] = json!({"example.org/blob": "x".repeat(4 * 1024 * 1024)});
    let bytes = serde_json::to_vec(&body)?;
    // Whether a dropped connection is noticed before the next request is a race: try a few
    // times so a gateway that closes without saying so is caught.
    for attempt in 1..=5 {
        let resp = api
            .request(Method::POST, &instances())
            .header(CONTENT_TYPE, "application/json")
            .body(bytes.clone())
            .send()
            .await
            .context("sending a 4 MiB body")?;
        let says_close = resp
            .headers()
            .get(CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        expect_status(resp, 413, "RequestEntityTooLarge").await?;
        if says_close {
            continue;
        }
        api.items(&format!("{API}/instances"))
            .await
            .with_context(|| {
                format!(
                    "attempt {attempt}: the 413 answer kept the connection alive (no \
                 `Connection: close`), but the next request on it failed"
                )
            })?;
    }
    ensure_nothing_stored(&c.admin_api()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn update_with_a_stale_resource_version_is_a_conflict() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let first = create(&api, "a").await?;

    // Someone else updates the record: `first` is stale now.
    let mut theirs = first.clone();
    theirs["spec"]["instanceType"] = json!("m1.medium");
    let resp = api
        .request(Method::PUT, &instance("a"))
        .json(&theirs)
        .send()
        .await?;
    ensure!(resp.status() == 200, "update: {}", resp.text().await?);
    let current = api.get_json(&instance("a")).await?;

    let mut mine = first.clone();
    mine["spec"]["instanceType"] = json!("c1.medium");
    let resp = api
        .request(Method::PUT, &instance("a"))
        .json(&mine)
        .send()
        .await?;
    let status = expect_status(resp, 409, "Conflict").await?;
    ensure!(
        message(&status).contains("modified"),
        "the message does not explain the conflict: {status}"
    );
    ensure!(
        api.get_json(&instance("a")).await? == current,
        "a conflicting update changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_patch_that_sets_a_stale_resource_version_is_a_conflict() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let first = create(&api, "a").await?;
    let stale = first["metadata"]["resourceVersion"].clone();
    let resp = api
        .request(Method::PUT, &instance("a"))
        .json(&json!({
            "apiVersion": first["apiVersion"], "kind": "Instance",
            "metadata": {"name": "a", "resourceVersion": stale},
            "spec": {"imageId": first["spec"]["imageId"], "instanceType": "m1.medium"},
        }))
        .send()
        .await?;
    ensure!(resp.status() == 200, "update: {}", resp.text().await?);
    let current = api.get_json(&instance("a")).await?;

    // As kubectl rewrites managedFields: the version it read, then the new entries.
    let patch = json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "replace", "path": "/metadata/managedFields", "value": [{}]},
    ]);
    let resp = send_patch(&api, "a", "application/json-patch+json", &patch).await?;
    expect_status(resp, 409, "Conflict").await?;
    ensure!(
        api.get_json(&instance("a")).await? == current,
        "a patch against a stale version changed the record"
    );
    // The same patch naming the current version goes through.
    let patch = json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
        {"op": "replace", "path": "/metadata/managedFields", "value": [{}]},
    ]);
    let resp = send_patch(&api, "a", "application/json-patch+json", &patch).await?;
    ensure!(resp.status() == 200, "patch: {}", resp.text().await?);
    let cleared = api.get_json(&instance("a")).await?;
    ensure!(
        cleared["metadata"].get("managedFields").is_none(),
        "managedFields: [{{}}] clears them: {cleared}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_label_key_or_value_kubernetes_refuses_is_invalid_and_stores_nothing(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    for (labels, named) in [
        (json!({"bad label!": "x"}), "bad label!"),
        (json!({"app": "bad value"}), "bad value"),
        (json!({"app": "v".repeat(64)}), "63 characters"),
        (json!("oops"), "must be a map"),
        (json!(["a"]), "must be a map"),
    ] {
        let mut body = instance_json("labelled");
        body["metadata"]["labels"] = labels;
        let status = expect_status(post_json(&api, &body, "").await?, 422, "Invalid").await?;
        ensure!(
            message(&status).contains(named),
            "the message does not name the problem ({named}): {status}"
        );
    }
    ensure_nothing_stored(&api).await?;
    // Nor can a merge patch put one on a record.
    create(&api, "a").await?;
    let bad_key = json!({"metadata": {"annotations": {"bad key!": "x"}}});
    let resp = send_patch(&api, "a", "application/merge-patch+json", &bad_key).await?;
    expect_status(resp, 422, "Invalid").await?;
    // Labels that are not a map are refused, never replaced by none.
    let labelled = json!({"metadata": {"labels": {"team": "a"}}});
    let resp = send_patch(&api, "a", "application/merge-patch+json", &labelled).await?;
    ensure!(resp.status() == 200, "labelling: {}", resp.text().await?);
    let before = api.get_json(&instance("a")).await?;
    for (ct, patch) in [
        (
            "application/merge-patch+json",
            json!({"metadata": {"labels": "oops"}}),
        ),
        (
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/metadata/labels", "value": ["x"]}]),
        ),
    ] {
        let resp = send_patch(&api, "a", ct, &patch).await?;
        let status = expect_status(resp, 422, "Invalid").await?;
        ensure!(
            message(&status).contains("metadata.labels"),
            "the message does not name the field: {status}"
        );
    }
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "a refused patch of the labels changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_that_names_no_resource_version_is_invalid_and_changes_nothing(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let first = create(&api, "a").await?;
    let mut blind = first.clone();
    blind["metadata"]
        .as_object_mut()
        .context("metadata")?
        .remove("resourceVersion");
    blind["spec"]["instanceType"] = json!("c1.medium");
    let resp = api
        .request(Method::PUT, &instance("a"))
        .json(&blind)
        .send()
        .await?;
    let status = expect_status(resp, 422, "Invalid").await?;
    ensure!(
        message(&status).contains("metadata.resourceVersion"),
        "the message does not name the field: {status}"
    );
    ensure!(
        api.get_json(&instance("a")).await? == first,
        "an update without a version changed the record"
    );
    // Of a record that is not there, it is NotFound, as kube-apiserver answers.
    let resp = api
        .request(Method::PUT, &instance("ghost"))
        .json(&blind)
        .send()
        .await?;
    expect_status(resp, 404, "NotFound").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_moving_a_record_to_another_namespace_is_a_bad_request() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let first = create(&api, "a").await?;
    let mut moved = first.clone();
    moved["metadata"]["namespace"] = json!("elsewhere");
    let resp = api
        .request(Method::PUT, &instance("a"))
        .json(&moved)
        .send()
        .await?;
    let status = expect_status(resp, 400, "BadRequest").await?;
    ensure!(message(&status).contains("namespace"), "{status}");
    ensure!(
        api.get_json(&instance("a")).await? == first,
        "a refused update changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn creating_a_namespaced_record_at_the_all_namespaces_path_is_not_allowed(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let resp = api
        .request(Method::POST, &format!("{API}/instances"))
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&instance_json("nowhere"))?)
        .send()
        .await?;
    let status = expect_status(resp, 405, "MethodNotAllowed").await?;
    ensure!(
        message(&status).contains("namespaces/<namespace>/instances"),
        "{status}"
    );
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_image_id_is_invalid() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let mut body = instance_json("a");
    body["spec"]["imageId"] = json!("not-an-image");
    let status = expect_status(post_json(&api, &body, "").await?, 422, "Invalid").await?;
    ensure!(
        message(&status).contains("spec.imageId"),
        "the message does not name spec.imageId: {status}"
    );
    ensure_nothing_stored(&api).await
}

/// Each refused field is a cause of the Status, naming the field, with the cause type
/// kube-apiserver gives that error (`FieldValueRequired`, `FieldValueTooLong` …).
#[tokio::test(flavor = "multi_thread")]
async fn invalid_spec_value_is_named_in_the_status_causes() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let changed = |change: &dyn Fn(&mut Value)| {
        let mut body = instance_json("a");
        change(&mut body);
        body
    };
    let cases = [
        (
            "a wrong image ID",
            changed(&|b| b["spec"]["imageId"] = json!("not-an-image")),
            "spec.imageId",
            "FieldValueInvalid",
        ),
        (
            "no image ID",
            changed(&|b| {
                b["spec"].as_object_mut().map(|spec| spec.remove("imageId"));
            }),
            "spec.imageId",
            "FieldValueRequired",
        ),
        (
            "an unknown state",
            changed(&|b| b["spec"]["desiredState"] = json!("flying")),
            "spec.desiredState",
            "FieldValueNotSupported",
        ),
        (
            // Over Kubernetes' 256 KiB of annotations, within the body limit.
            "long annotations",
            changed(&|b| {
                b["metadata"]["annotations"] = json!({"example.org/blob": "x".repeat(300 * 1024)})
            }),
            "metadata.annotations",
            "FieldValueTooLong",
        ),
    ];
    for (what, body, field, reason) in cases {
        let status = expect_status(post_json(&api, &body, "").await?, 422, "Invalid").await?;
        let causes = status["details"]["causes"]
            .as_array()
            .with_context(|| format!("{what}: an Invalid Status without details.causes"))?;
        ensure!(
            causes
                .iter()
                .any(|c| c["field"] == field && c["reason"] == reason),
            "{what}: no cause {reason} for {field}: {status}"
        );
    }
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_resource_path_is_a_not_found_status() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    for path in [
        format!("{API}/widgets"),
        format!("{API}/namespaces/acme/widgets/w"),
        format!("{API}/namespaces/acme/instances/a/scale"),
        "/apis/other.example/v1/things".to_string(),
    ] {
        let resp = api.request(Method::GET, &path).send().await?;
        expect_status(resp, 404, "NotFound")
            .await
            .with_context(|| format!("GET {path}"))?;
    }
    let resp = api
        .request(Method::POST, &format!("{API}/namespaces/acme/widgets"))
        .json(&instance_json("a"))
        .send()
        .await?;
    expect_status(resp, 404, "NotFound").await?;
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_unknown_token_is_unauthorized() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let anonymous = c.api(None)?;
    let stranger = c.api(Some("not-a-token-the-gateway-knows-0000"))?;
    for api in [&anonymous, &stranger] {
        let resp = api.request(Method::GET, &instances()).send().await?;
        expect_status(resp, 401, "Unauthorized").await?;
        let resp = post_json(api, &instance_json("a"), "").await?;
        expect_status(resp, 401, "Unauthorized").await?;
    }
    ensure_nothing_stored(&c.admin_api()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn strategic_merge_patch_is_an_unsupported_media_type() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "a").await?;
    let before = api.get_json(&instance("a")).await?;
    let resp = api
        .request(Method::PATCH, &instance("a"))
        .header(CONTENT_TYPE, "application/strategic-merge-patch+json")
        .body(r#"{"spec":{"instanceType":"c1.medium"}}"#)
        .send()
        .await?;
    let status = expect_status(resp, 415, "UnsupportedMediaType").await?;
    ensure!(
        message(&status).contains("merge-patch+json"),
        "the message does not point to a supported patch type: {status}"
    );
    ensure!(
        !message(&status).contains("application/json,"),
        "the message offers a body type that is no patch: {status}"
    );
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "a refused patch changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patch_nesting_the_record_too_deep_is_invalid_and_the_record_stays_readable(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "a").await?;
    let before = api.get_json(&instance("a")).await?;
    // Each value is shallow enough for a request body; the second goes inside the first, so
    // that together they nest deeper than the gateway could read the record back.
    let mut deep = json!("leaf");
    for _ in 0..110 {
        deep = json!({ "f:a": deep });
    }
    let inside = format!("/metadata/managedFields/0/fieldsV1{}", "/f:a".repeat(100));
    let patch = json!([
        {
            "op": "add",
            "path": "/metadata/managedFields",
            "value": [{"manager": "deep", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": deep}],
        },
        {"op": "add", "path": format!("{inside}/f:b"), "value": deep},
    ]);
    let resp = api
        .request(Method::PATCH, &instance("a"))
        .header(CONTENT_TYPE, "application/json-patch+json")
        .body(serde_json::to_vec(&patch)?)
        .send()
        .await?;
    let status = expect_status(resp, 422, "Invalid").await?;
    ensure!(message(&status).contains("deep"), "{status}");
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "a refused patch changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_patch_whose_copies_double_the_record_is_too_large_and_the_gateway_lives_on(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "a").await?;
    let before = api.get_json(&instance("a")).await?;
    // Each copy doubles the spec: 40 of them would ask for 2^40 copies of it.
    let copies: Vec<Value> = (0..40)
        .map(|n| json!({"op": "copy", "from": "/spec", "path": format!("/spec/x{n}")}))
        .collect();
    let resp = api
        .request(Method::PATCH, &format!("{}?dryRun=All", instance("a")))
        .header(CONTENT_TYPE, "application/json-patch+json")
        .body(serde_json::to_vec(&copies)?)
        .send()
        .await?;
    expect_status(resp, 413, "RequestEntityTooLarge").await?;
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "a refused patch changed the record"
    );

    let too_many: Vec<Value> = (0..10_001)
        .map(|_| json!({"op": "test", "path": "/spec/instanceType", "value": "t1.micro"}))
        .collect();
    let resp = api
        .request(Method::PATCH, &instance("a"))
        .header(CONTENT_TYPE, "application/json-patch+json")
        .body(serde_json::to_vec(&too_many)?)
        .send()
        .await?;
    // As kube-apiserver answers it (patch.go: NewRequestEntityTooLargeError).
    let status = expect_status(resp, 413, "RequestEntityTooLarge").await?;
    ensure!(message(&status).contains("10000"), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_with_resource_version_match_but_no_initial_events_is_invalid() -> anyhow::Result<()>
{
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let resp = api
        .request(
            Method::GET,
            &format!("{}?watch=1&resourceVersionMatch=NotOlderThan", instances()),
        )
        .send()
        .await?;
    let status = expect_status(resp, 422, "Invalid").await?;
    ensure!(
        message(&status).contains("sendInitialEvents"),
        "the refusal does not say why: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn json_patch_with_a_failing_test_op_is_invalid_and_changes_nothing() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "a").await?;
    let before = api.get_json(&instance("a")).await?;
    let resp = api
        .request(Method::PATCH, &instance("a"))
        .header(CONTENT_TYPE, "application/json-patch+json")
        .body(
            r#"[{"op":"test","path":"/spec/instanceType","value":"c1.medium"},
                {"op":"replace","path":"/spec/instanceType","value":"m1.medium"}]"#,
        )
        .send()
        .await?;
    let status = expect_status(resp, 422, "Invalid").await?;
    ensure!(
        message(&status).contains("/spec/instanceType"),
        "the message does not name the failing path: {status}"
    );
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "a failed JSON patch changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn creating_the_same_name_twice_is_already_exists() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "a").await?;
    let before = api.get_json(&instance("a")).await?;
    let mut again = instance_json("a");
    again["spec"]["instanceType"] = json!("c1.medium");
    let status = expect_status(post_json(&api, &again, "").await?, 409, "AlreadyExists").await?;
    ensure!(
        message(&status).contains("\"a\" already exists"),
        "the message does not say a exists: {status}"
    );
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "the second create changed the record"
    );
    ensure!(
        all_instances(&api).await?.len() == 1,
        "a second record was stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_apply_with_an_unknown_spec_field_fails_with_a_strict_decoding_error(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let manifest = c.manifest(
        "typo.yaml",
        &format!(
            "{}  imageID: emi-0123456789abcdef0\n",
            instance_yaml("typo", "m1.small")
        ),
    )?;
    let path = manifest.to_str().context("path is not UTF-8")?;
    let stderr = kubectl_err(&c.admin, &["apply", "-f", path])?;
    ensure!(
        stderr.contains("Error from server (BadRequest)")
            && stderr.contains("strict decoding error")
            && stderr.contains("spec.imageID"),
        "kubectl apply does not report the unknown field:\n{stderr}"
    );
    let listed = kubectl_ok(&c.admin, &["get", "instances", "-A", "-o", "name"])?;
    ensure!(listed.trim().is_empty(), "a refused apply stored: {listed}");
    ensure_nothing_stored(&c.admin_api()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_of_the_wrong_shape_is_invalid_and_the_record_stays_readable() -> anyhow::Result<()>
{
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    create(&api, "a").await?;
    let before = api.get_json(&instance("a")).await?;
    // Each of these, stored, would make the record unreadable to a typed client (Karri's own
    // operator lists instances typed: one such record would stall it for every tenant).
    for (patch, field) in [
        (
            json!({"metadata": {"ownerReferences": "x"}}),
            "metadata.ownerReferences",
        ),
        (
            json!({"metadata": {"finalizers": [1]}}),
            "metadata.finalizers",
        ),
        (
            json!({"metadata": {"ownerReferences": [{"kind": "Account", "name": "n"}]}}),
            "metadata.ownerReferences[0].apiVersion",
        ),
        (
            json!({"metadata": {"managedFields": [{"time": "yesterday"}]}}),
            "metadata.managedFields[0].time",
        ),
    ] {
        let resp = api
            .request(Method::PATCH, &instance("a"))
            .header(CONTENT_TYPE, "application/merge-patch+json")
            .body(serde_json::to_vec(&patch)?)
            .send()
            .await?;
        let status = expect_status(resp, 422, "Invalid").await?;
        ensure!(
            status["details"]["causes"]
                .as_array()
                .is_some_and(|causes| causes.iter().any(|c| c["field"] == field)),
            "{patch}: no cause names {field}: {status}"
        );
    }
    let mut body = instance_json("b");
    body["metadata"]["finalizers"] = json!("example.com/x");
    expect_status(post_json(&api, &body, "").await?, 422, "Invalid").await?;
    ensure!(
        api.get_json(&instance("a")).await? == before,
        "a refused patch changed the record"
    );
    ensure!(
        all_instances(&api).await?.len() == 1,
        "a refused create stored a record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_in_an_unsupported_media_type_is_415_so_clients_fall_back_to_json(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    for media_type in [
        "application/cbor",
        "application/vnd.kubernetes.protobuf",
        "application/apply-patch+yaml",
    ] {
        let resp = api
            .request(Method::POST, &instances())
            .header(CONTENT_TYPE, media_type)
            .body(serde_json::to_vec(&instance_json("a"))?)
            .send()
            .await?;
        expect_status(resp, 415, "UnsupportedMediaType")
            .await
            .with_context(|| format!("POST as {media_type}"))?;
    }
    ensure_nothing_stored(&api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn nulls_the_schema_does_not_allow_are_pruned_and_defaulted_not_refused() -> anyhow::Result<()>
{
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    // What Helm or Kustomize render for values left empty.
    let mut body = instance_json("a");
    body["spec"]["desiredState"] = Value::Null;
    body["spec"]["securityGroupIds"] = Value::Null;
    let resp = post_json(&api, &body, "").await?;
    let code = resp.status();
    let text = resp.text().await?;
    ensure!(code == 201, "a create with null fields: {code} {text}");
    let stored = api.get_json(&instance("a")).await?;
    ensure!(
        stored["spec"]["desiredState"] == "running",
        "the null desiredState was not defaulted: {}",
        stored["spec"]
    );
    Ok(())
}

/// A request option Kubernetes does not know (`dryRun`, `fieldValidation`, `force`,
/// `fieldManager`, `propagationPolicy`) is a 422 on the request's options kind of group
/// `meta.k8s.io`, naming the field, as kube-apiserver answers; nothing is stored or changed.
#[tokio::test(flavor = "multi_thread")]
async fn request_options_kubernetes_does_not_know_are_invalid_and_change_nothing(
) -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let invalid = |options: &'static str, field: &'static str| {
        move |resp: reqwest::Response| async move {
            let status = expect_status(resp, 422, "Invalid").await?;
            ensure!(
                status.pointer("/details/kind") == Some(&json!(options))
                    && status.pointer("/details/group") == Some(&json!("meta.k8s.io"))
                    && status.pointer("/details/causes/0/field") == Some(&json!(field)),
                "expected {options}.{field}: {status}"
            );
            let reason = match field {
                "force" => "FieldValueForbidden",
                "fieldManager" => "FieldValueRequired",
                _ if message(&status).contains("cannot both be set") => "FieldValueInvalid",
                _ => "FieldValueNotSupported",
            };
            ensure!(
                status.pointer("/details/causes/0/reason") == Some(&json!(reason)),
                "expected the cause {reason}: {status}"
            );
            ensure!(
                message(&status)
                    .starts_with(&format!("{options}.meta.k8s.io \"\" is invalid: {field}")),
                "{status}"
            );
            anyhow::Ok(())
        }
    };

    for (query, field) in [
        ("?dryRun=Some", "dryRun"),
        ("?dryRun=", "dryRun"),
        ("?fieldValidation=Loose", "fieldValidation"),
    ] {
        let resp = post_json(&api, &instance_json("a"), query).await?;
        invalid("CreateOptions", field)(resp).await?;
    }
    ensure_nothing_stored(&api).await?;

    let stored = create(&api, "a").await?;
    let mut changed = stored.clone();
    changed["spec"]["instanceType"] = json!("m1.medium");
    let resp = api
        .request(Method::PUT, &format!("{}?dryRun=all", instance("a")))
        .json(&changed)
        .send()
        .await?;
    invalid("UpdateOptions", "dryRun")(resp).await?;

    let merge = json!({"spec": {"instanceType": "m1.medium"}});
    let resp = api
        .request(Method::PATCH, &format!("{}?force=true", instance("a")))
        .header(CONTENT_TYPE, "application/merge-patch+json")
        .body(serde_json::to_vec(&merge)?)
        .send()
        .await?;
    invalid("PatchOptions", "force")(resp).await?;
    let resp = api
        .request(Method::PATCH, &instance("a"))
        .header(CONTENT_TYPE, "application/apply-patch+yaml")
        .body(serde_json::to_vec(&instance_json("a"))?)
        .send()
        .await?;
    invalid("PatchOptions", "fieldManager")(resp).await?;

    for query in [
        "?propagationPolicy=Sideways",
        "?propagationPolicy=",
        "?propagationPolicy=Orphan&orphanDependents=true",
        "?dryRun=None",
    ] {
        let field = if query.contains("dryRun") {
            "dryRun"
        } else {
            "propagationPolicy"
        };
        let resp = api
            .request(Method::DELETE, &format!("{}{query}", instance("a")))
            .send()
            .await?;
        invalid("DeleteOptions", field)(resp).await?;
    }
    // A dry run asked in the DeleteOptions body is checked the same way: not deleted.
    let resp = api
        .request(Method::DELETE, &instance("a"))
        .json(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["all"]}))
        .send()
        .await?;
    invalid("DeleteOptions", "dryRun")(resp).await?;
    // A delete has no fieldValidation: kube-apiserver ignores it there, and so does Karri.
    let resp = api
        .request(
            Method::DELETE,
            &format!("{}?dryRun=All&fieldValidation=Loose", instance("a")),
        )
        .send()
        .await?;
    ensure!(resp.status() == 200, "{}", resp.text().await?);
    ensure!(
        api.get_json(&instance("a")).await? == stored,
        "a refused request changed the record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_side_apply_naming_a_stale_resource_version_is_a_conflict() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let api = c.admin_api()?;
    let first = create(&api, "a").await?;
    let apply = |body: Value, name: &str| {
        api.request(
            Method::PATCH,
            &format!("{}?fieldManager=tester&force=true", instance(name)),
        )
        .header(CONTENT_TYPE, "application/apply-patch+yaml")
        .body(body.to_string())
    };
    let applied = |rv: &Value, name: &str, instance_type: &str| {
        json!({
            "apiVersion": first["apiVersion"], "kind": "Instance",
            "metadata": {"name": name, "resourceVersion": rv},
            "spec": {"imageId": first["spec"]["imageId"], "instanceType": instance_type},
        })
    };
    let stale = first["metadata"]["resourceVersion"].clone();
    let resp = apply(applied(&stale, "a", "m1.medium"), "a").send().await?;
    ensure!(resp.status() == 200, "apply: {}", resp.text().await?);
    let current = api.get_json(&instance("a")).await?;
    let resp = apply(applied(&stale, "a", "c1.medium"), "a").send().await?;
    expect_status(resp, 409, "Conflict").await?;
    ensure!(
        api.get_json(&instance("a")).await? == current,
        "an apply against a stale version changed the record"
    );
    // A version of a record that does not exist cannot hold: nothing is created.
    let resp = apply(applied(&stale, "b", "m1.small"), "b").send().await?;
    let status = expect_status(resp, 400, "BadRequest").await?;
    ensure!(
        message(&status).contains("resourceVersion should not be set"),
        "{status}"
    );
    let names: Vec<Value> = all_instances(&api)
        .await?
        .iter()
        .map(|i| i["metadata"]["name"].clone())
        .collect();
    ensure!(
        names == [json!("a")],
        "instances after the refused apply: {names:?}"
    );
    Ok(())
}
